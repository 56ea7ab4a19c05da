// The API's public face: startApi serves Tarmac's Machines API v1 (Fly's paths and shapes) on node:http.
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import FindMyWay from 'find-my-way';
import type { Catalog } from '../catalog/index.ts';
import { TarmacError } from '../shared/errors.ts';
import { newUlid } from '../shared/ids.ts';
import type { Logger } from '../shared/log.ts';
import type { IpPool } from '../shared/ip-pool.ts';
import { makeAuthenticator } from './auth.ts';
import { sendError, sendJson } from './http.ts';
import { embeddedFleetView, type FleetView } from './hosts.ts';
import { routes, type Ctx, type Deps, type Route, type WorkerLink } from './routes.ts';

export type { WorkerLink } from './routes.ts';
export type { FleetView, HostMirror } from './hosts.ts';

/** Response header on every answer while this host's copy of the catalog is not current: how stale it is, in ms. */
export const catalogStaleHeader = 'tarmac-catalog-stale';
export { maxBodyBytes } from './http.ts';
export { sharedCpusPerCore } from './placement.ts';

export interface ApiOptions {
  catalog: Catalog;
  listen: { host: string; port: number };
  log: Logger;
  /** Region this API places machines in when a request names none. */
  region: string;
  adminToken: string;
  workers?: WorkerLink;
  /** The fleet's catalog copies (etcd catalog); default: the embedded catalog's, always current. */
  fleet?: FleetView;
  /** Where app addresses come from (POST /v1/apps/{app}/ip_assignments); default: none, so allocation fails with a 412. */
  ipPool?: IpPool;
  /** The proxy's apps domain: `<app>.<domain>` names an app, so no app may claim a certificate for another's (default localhost). */
  appsDomain?: string;
  /** Closes the server when aborted. */
  signal?: AbortSignal;
}

export interface RunningApi {
  /** http://host:port */
  readonly url: string;
  close(): Promise<void>;
}

/** Every route the API serves, for docs and tests. */
export const apiRoutes: ReadonlyArray<{ method: string; path: string }> = [
  { method: 'GET', path: '/healthz' },
  ...routes.map((r) => ({ method: r.method, path: r.path })),
];

const methods = ['GET', 'POST', 'DELETE'] as const;

export async function startApi(opts: ApiOptions): Promise<RunningApi> {
  const log = opts.log.child({ component: 'api' });
  const fleet = opts.fleet ?? embeddedFleetView(opts.catalog);
  const deps: Deps = { catalog: opts.catalog, region: opts.region, workers: opts.workers, fleet, ipPool: opts.ipPool ?? { v4: [], v6: [] }, appsDomain: opts.appsDomain ?? 'localhost' };
  const authenticate = makeAuthenticator(opts.catalog, opts.adminToken);
  const closing = new AbortController();

  const router = FindMyWay({ ignoreTrailingSlash: true, maxParamLength: 200 });
  for (const r of routes) router.on(r.method, r.path, () => undefined, r);

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const started = process.hrtime.bigint();
    const url = new URL(req.url ?? '/', 'http://api.invalid');
    const rlog = log.child({ req_id: newUlid(), method: req.method, path: url.pathname });
    res.on('finish', () => {
      rlog.debug({ status: res.statusCode, ms: Number(process.hrtime.bigint() - started) / 1e6 }, 'request done');
    });
    // Reads answer from this host's copy of the catalog even when the catalog is unreachable: say how stale it is.
    const stale = fleet.catalogStaleMs();
    if (stale !== undefined) res.setHeader(catalogStaleHeader, String(Math.round(stale)));
    try {
      if (url.pathname === '/healthz' || url.pathname === '/v1/healthz') {
        if (req.method !== 'GET' && req.method !== 'HEAD') throw new TarmacError('method_not_allowed', `${req.method} is not allowed on ${url.pathname}`);
        sendJson(res, 200, { ok: true });
        return;
      }
      const method = (req.method ?? 'GET') as (typeof methods)[number];
      const found = methods.includes(method) ? router.find(method, url.pathname) : null;
      if (!found) {
        const allowed = methods.filter((m) => m !== method && router.find(m, url.pathname));
        if (allowed.length > 0) {
          sendError(res, new TarmacError('method_not_allowed', `${req.method} is not allowed on ${url.pathname}; use ${allowed.join(' or ')}`), { allow: allowed.join(', ') });
          return;
        }
        throw new TarmacError('not_found', `no route for ${req.method} ${url.pathname}`);
      }
      const principal = authenticate(req);
      const route = found.store as Route;
      const reqAbort = new AbortController();
      res.on('close', () => reqAbort.abort());
      const ctx: Ctx = {
        req,
        res,
        params: found.params,
        query: url.searchParams,
        principal,
        log: rlog,
        signal: AbortSignal.any([reqAbort.signal, closing.signal]),
        deps,
      };
      await route.handler(ctx);
    } catch (e) {
      if (e instanceof TarmacError) {
        if (e.httpStatus >= 500) rlog.warn({ code: e.code, err: e }, 'request failed');
        else rlog.debug({ code: e.code, msg: e.message }, 'request rejected');
        sendError(res, e);
      } else {
        rlog.error({ err: e }, 'request failed with an internal error');
        sendError(res, new TarmacError('internal', 'internal error; see the API server log', { cause: e }));
      }
    }
  };

  const server = createServer({ requestTimeout: 0, headersTimeout: 30_000, keepAliveTimeout: 5_000 }, (req, res) => {
    void handle(req, res);
  });
  server.on('clientError', (err, socket) => {
    if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
    else socket.destroy(err);
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.listen.port, opts.listen.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const addr = server.address() as AddressInfo;
  const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  const url = `http://${host}:${addr.port}`;
  log.info({ url }, 'api listening');

  let closed: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closed ??= new Promise<void>((resolve) => {
      closing.abort();
      server.close(() => resolve());
      server.closeIdleConnections();
      // Long waits and log streams end on `closing`; cut whatever is left.
      setImmediate(() => server.closeAllConnections());
    }).then(() => log.info('api closed'));
    return closed;
  };
  if (opts.signal) {
    if (opts.signal.aborted) await close();
    else opts.signal.addEventListener('abort', () => void close(), { once: true });
  }
  return { url, close };
}
