// The HTTP/1.1 proxy: node:http in, one undici Pool per machine out, routed by Host from the in-memory table.
import { channel } from 'node:diagnostics_channel';
import { randomBytes } from 'node:crypto';
import { createServer, IncomingMessage, ServerResponse, type Server } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import { Pool, type Dispatcher } from 'undici';
import type { ChangeBatch } from '../catalog/index.ts';
import { TarmacError, errorMessage } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';
import { type ProxyErrorCode, sendClientError, sendProxyError } from './errors.ts';
import { addForwarding, clientAddress, type ForwardingConstants, readRequestHead, responseHeaders } from './headers.ts';
import { type AppRoute, type Backend, RouteIndex, type RouteSource, type RoutingTable } from './routing.ts';

/** Timeouts in milliseconds; every one has a default. */
export interface ProxyTimeouts {
  /** Time a machine has to send response headers (504 after). Default 60 s. */
  backendHeadersMs?: number;
  /** Longest pause between body chunks from a machine. Default 300 s. */
  backendBodyMs?: number;
  /** Time to open a connection to a machine. Default 5 s. */
  backendConnectMs?: number;
  /** Time a client has to send its request headers (node:http headersTimeout). Default 30 s. */
  clientHeadersMs?: number;
  /** Time a client has to send its whole request (node:http requestTimeout; 0 disables). Default 300 s. */
  clientRequestMs?: number;
  /** Idle time before a client keep-alive connection is closed. Default 30 s. */
  keepAliveMs?: number;
  /** How long close() waits for in-flight requests before cutting them. Default 10 s. */
  drainMs?: number;
}

export interface ProxyOptions {
  /** The catalog (or a cluster worker's feed of it). */
  catalog: RouteSource;
  http: { host: string; port: number };
  /** Apps are served at `<app>.<appsDomain>`. Default 'localhost'. */
  appsDomain?: string;
  log: Logger;
  /** Aborting it closes the proxy (as close() does). */
  signal?: AbortSignal;
  /** Region of this host, sent as Fly-Region. Default 'local'. */
  region?: string;
  timeouts?: ProxyTimeouts;
}

export interface RunningProxy {
  readonly address: { host: string; port: number };
  /** The current routing snapshot (read-only; for tests and metrics). */
  readonly routes: RoutingTable;
  /** Stops accepting, drains in-flight requests up to the drain timeout, then cuts the rest and closes pools. */
  close(): Promise<void>;
}

/** Name of the diagnostics channel carrying one ProxyRequestEvent per finished request. */
export const proxyRequestChannel = 'tarmac:proxy:request';

/** Published on `tarmac:proxy:request` when a request's response is done (or the client left). */
export interface ProxyRequestEvent {
  readonly requestId: string;
  readonly method: string;
  readonly host: string | undefined;
  readonly app: string | undefined;
  readonly machineId: string | undefined;
  /** Status sent to the client; 0 when the client left before a response started. */
  readonly status: number;
  readonly error: ProxyErrorCode | 'client_closed' | undefined;
  /** Machines tried (0 when the proxy answered itself). */
  readonly attempts: number;
  readonly durationMs: number;
}

const requestEvents = channel(proxyRequestChannel);

const defaults: Required<ProxyTimeouts> = {
  backendHeadersMs: 60_000,
  backendBodyMs: 300_000,
  backendConnectMs: 5_000,
  clientHeadersMs: 30_000,
  clientRequestMs: 300_000,
  keepAliveMs: 30_000,
  drainMs: 10_000,
};

/** Errors that say nothing about reaching a machine: never retried elsewhere. */
const notNetworkErrors: ReadonlySet<string> = new Set([
  'UND_ERR_INVALID_ARG', 'UND_ERR_NOT_SUPPORTED', 'UND_ERR_ABORTED', 'UND_ERR_REQ_CONTENT_LENGTH_MISMATCH',
]);

class ClientClosedError extends Error {
  override readonly name = 'ClientClosedError';
  readonly code = 'TARMAC_CLIENT_CLOSED';
}
const clientClosed = new ClientClosedError('the client closed the connection');

/** node:http's response with the per-request state the proxy needs, so listeners can be shared functions. */
class ProxyResponse extends ServerResponse<IncomingMessage> {
  exchange: Exchange | null = null;
  requestId = '';
  host: string | undefined = undefined;
  app: string | undefined = undefined;
  startedAt = 0;
  errorCode: ProxyErrorCode | 'client_closed' | undefined = undefined;
}

function errorCodeOf(err: Error): string {
  const code = (err as { code?: unknown }).code;
  return typeof code === 'string' ? code : '';
}

/** One client request forwarded to a machine: the undici dispatch handler, streaming both ways. */
class Exchange implements Dispatcher.DispatchHandler {
  attempts = 0;
  connected = false;
  done = false;
  clientGone = false;
  abort: ((err?: Error) => void) | null = null;
  resume: (() => void) | null = null;

  constructor(
    readonly proxy: HttpProxy,
    readonly req: IncomingMessage,
    readonly res: ProxyResponse,
    readonly app: string,
    public backend: Backend,
    readonly headers: string[],
    readonly hasBody: boolean,
  ) {}

  send(): void {
    this.attempts++;
    this.connected = false;
    this.abort = null;
    this.proxy.poolFor(this.backend).dispatch({
      path: this.req.url ?? '/',
      method: this.req.method ?? 'GET',
      headers: this.headers,
      body: this.hasBody ? this.req : null,
    }, this);
  }

  onConnect(abort: (err?: Error) => void): void {
    this.connected = true;
    this.abort = abort;
    if (this.clientGone) abort(clientClosed);
  }

  onHeaders(statusCode: number, rawHeaders: Buffer[], resume: () => void, statusText: string): boolean {
    if (statusCode < 200) return true; // interim responses (103 and the like) are not relayed yet
    if (this.done) return false;
    this.resume = resume;
    const res = this.res;
    const headers = responseHeaders(rawHeaders, res.requestId);
    if (this.proxy.closing) res.shouldKeepAlive = false;
    try {
      if (statusText) res.writeHead(statusCode, statusText, headers);
      else res.writeHead(statusCode, headers);
    } catch (err) {
      // A header node:http refuses to send: treat it as a broken response.
      this.abort?.(err as Error);
      return false;
    }
    return true;
  }

  onData(chunk: Buffer): boolean {
    return this.res.write(chunk);
  }

  onComplete(): void {
    if (this.done) return;
    this.done = true;
    this.res.end();
  }

  onError(err: Error): void {
    if (this.done) return;
    const res = this.res;
    if (this.clientGone) {
      this.done = true;
      return;
    }
    const code = errorCodeOf(err);
    const unreachable = !this.connected && !notNetworkErrors.has(code);
    if (unreachable && this.attempts < 2) {
      const next = this.proxy.pickOther(this.app, this.backend);
      if (next !== undefined) {
        this.backend = next;
        this.send();
        return;
      }
    }
    this.done = true;
    if (unreachable) {
      res.errorCode = 'backend_unreachable';
      sendProxyError(res, 'backend_unreachable', `could not reach a machine of app ${this.app}`, res.requestId);
    } else if (code === 'UND_ERR_HEADERS_TIMEOUT') {
      res.errorCode = 'backend_timeout';
      sendProxyError(res, 'backend_timeout', `a machine of app ${this.app} did not answer in time`, res.requestId);
    } else if (code === 'UND_ERR_INVALID_ARG' || code === 'UND_ERR_NOT_SUPPORTED') {
      res.errorCode = 'bad_request';
      sendProxyError(res, 'bad_request', `the request cannot be forwarded: ${err.message}`, res.requestId);
    } else {
      res.errorCode = 'backend_error';
      sendProxyError(res, 'backend_error', `a machine of app ${this.app} closed the connection or sent an invalid response`, res.requestId);
    }
  }
}

/** Most hosts repeat: their parsed app name is cached, up to this many distinct Host values. */
const hostCacheLimit = 10_000;

class HttpProxy implements RunningProxy {
  closing = false;
  readonly #opts: ProxyOptions;
  readonly #t: Required<ProxyTimeouts>;
  readonly #log: Logger;
  readonly #index: RouteIndex;
  #table: RoutingTable;
  readonly #pools = new Map<string, Pool>();
  readonly #poolOptions: Pool.Options;
  readonly #server: Server<typeof IncomingMessage, typeof ProxyResponse>;
  readonly #unsubscribe: () => void;
  readonly #suffix: string;
  readonly #hostCache = new Map<string, string>();
  readonly #fwd: ForwardingConstants;
  readonly #idPrefix = randomBytes(6).toString('hex');
  readonly #idSuffix: string;
  #seq = 0;
  #swapScheduled = false;
  #inflight = 0;
  #drained: (() => void) | null = null;
  #closed: Promise<void> | null = null;
  #address: { host: string; port: number } = { host: '', port: 0 };
  /** One shared 'close' listener for every response (`this` is the response), so no closure per request. */
  readonly #onResponseClose: (this: ProxyResponse) => void;

  constructor(opts: ProxyOptions) {
    this.#opts = opts;
    const proxy = this;
    this.#onResponseClose = function onResponseClose(this: ProxyResponse) { proxy.#responseClosed(this); };
    this.#t = { ...defaults, ...opts.timeouts };
    this.#log = opts.log.child({ component: 'proxy' });
    this.#suffix = `.${(opts.appsDomain ?? 'localhost').toLowerCase().replace(/^\.+|\.+$/g, '')}`;
    const region = opts.region ?? 'local';
    this.#fwd = { port: String(opts.http.port), region };
    this.#idSuffix = `-${region}`;
    this.#poolOptions = {
      pipelining: 1,
      headersTimeout: this.#t.backendHeadersMs,
      bodyTimeout: this.#t.backendBodyMs,
      connectTimeout: this.#t.backendConnectMs,
      keepAliveTimeout: 4_000,
    };

    // Load, then subscribe, in one synchronous step: no batch can fall between the two.
    this.#index = new RouteIndex(opts.catalog);
    this.#table = this.#index.table;
    this.#unsubscribe = opts.catalog.subscribe((batch) => this.#onBatch(batch));

    const t = this.#t;
    const clientRequestMs = t.clientRequestMs > 0 ? Math.max(t.clientRequestMs, t.clientHeadersMs) : 0;
    this.#server = createServer<typeof IncomingMessage, typeof ProxyResponse>({
      ServerResponse: ProxyResponse,
      headersTimeout: t.clientHeadersMs,
      requestTimeout: clientRequestMs,
      connectionsCheckingInterval: Math.max(100, Math.min(t.clientHeadersMs / 4, 5_000)),
      requireHostHeader: true,
      noDelay: true,
    }, (req, res) => this.#onRequest(req, res));
    this.#server.keepAliveTimeout = t.keepAliveMs;
    this.#server.on('clientError', (err: Error, socket: Socket) => this.#onClientError(err, socket));
  }

  get address(): { host: string; port: number } {
    return this.#address;
  }

  get routes(): RoutingTable {
    return this.#table;
  }

  async listen(): Promise<void> {
    const { host, port } = this.#opts.http;
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error) => reject(new TarmacError('unavailable', `the proxy cannot listen on ${host}:${port}: ${err.message}; free the port or configure another`, { cause: err }));
      this.#server.once('error', onError);
      this.#server.listen(port, host, () => {
        this.#server.off('error', onError);
        resolve();
      });
    });
    const a = this.#server.address() as AddressInfo;
    this.#address = { host: a.address, port: a.port };
    this.#fwd.port = String(a.port);
    this.#server.on('error', (err) => this.#log.error({ err }, 'proxy server error'));
    const signal = this.#opts.signal;
    if (signal) {
      if (signal.aborted) void this.close();
      else signal.addEventListener('abort', () => void this.close(), { once: true });
    }
    this.#log.info({ address: this.#address, apps: this.#table.apps.size }, 'proxy listening');
  }

  close(): Promise<void> {
    return (this.#closed ??= this.#close());
  }

  /** The pool of a backend's origin, created on first use; pools of origins that left the table are closed at swap. */
  poolFor(b: Backend): Pool {
    let pool = this.#pools.get(b.origin);
    if (pool === undefined) {
      pool = new Pool(b.origin, this.#poolOptions);
      this.#pools.set(b.origin, pool);
    }
    return pool;
  }

  /** Another backend of the app from the current table, for a retry after a connect failure. */
  pickOther(app: string, failed: Backend): Backend | undefined {
    const route = this.#table.apps.get(app);
    if (route === undefined) return undefined;
    const list = route.backends;
    for (let n = 0; n < list.length; n++) {
      const b = pick(route);
      if (b.machineId !== failed.machineId && b.origin !== failed.origin) return b;
    }
    return undefined;
  }

  #onRequest(req: IncomingMessage, res: ProxyResponse): void {
    this.#inflight++;
    res.startedAt = performance.now();
    res.on('close', this.#onResponseClose);
    if (this.closing) res.shouldKeepAlive = false;
    const head = readRequestHead(req.rawHeaders);
    const requestId = `${this.#idPrefix}${(++this.#seq).toString(36)}${this.#idSuffix}`;
    res.requestId = requestId;
    res.host = head.host;
    if (head.invalid !== undefined) {
      res.errorCode = 'bad_request';
      sendProxyError(res, 'bad_request', `bad request: ${head.invalid}`, requestId);
      return;
    }
    const app = head.host === undefined ? undefined : this.#appOf(head.host);
    res.app = app;
    const route = app === undefined ? undefined : this.#table.apps.get(app);
    if (route === undefined) {
      res.errorCode = 'app_not_found';
      sendProxyError(res, 'app_not_found', `no app is served at host ${head.host ?? '(none)'}`, requestId);
      return;
    }
    if (route.backends.length === 0) {
      res.errorCode = 'no_machine';
      sendProxyError(res, 'no_machine', `no started machine can serve app ${route.app}`, requestId);
      return;
    }
    addForwarding(head.headers, clientAddress(req.socket.remoteAddress), head.forwardedFor, requestId, this.#fwd);
    const ex = new Exchange(this, req, res, route.app, pick(route), head.headers, head.hasBody);
    res.exchange = ex;
    res.on('drain', onResponseDrain);
    ex.send();
  }

  /** Runs once per response, when it is done or its client left: accounting, client aborts, the request event. */
  #responseClosed(res: ProxyResponse): void {
    this.#inflight--;
    const ex = res.exchange;
    if (ex !== null && !ex.done) {
      ex.clientGone = true;
      res.errorCode = 'client_closed';
      ex.abort?.(clientClosed);
    }
    if (requestEvents.hasSubscribers) {
      const event: ProxyRequestEvent = {
        requestId: res.requestId,
        method: res.req.method ?? '',
        host: res.host,
        app: res.app,
        machineId: ex?.backend.machineId,
        status: res.headersSent ? res.statusCode : 0,
        error: res.errorCode,
        attempts: ex?.attempts ?? 0,
        durationMs: performance.now() - res.startedAt,
      };
      requestEvents.publish(event);
    }
    if (this.closing) {
      this.#server.closeIdleConnections();
      if (this.#inflight === 0) this.#drained?.();
    }
  }

  #appOf(host: string): string | undefined {
    const cached = this.#hostCache.get(host);
    if (cached !== undefined) return cached;
    let end = host.length;
    if (host.charCodeAt(0) === 91 /* [ */) return undefined; // an IPv6 literal names no app
    const colon = host.indexOf(':');
    if (colon !== -1) end = colon;
    if (end > 0 && host.charCodeAt(end - 1) === 46 /* . */) end--;
    const name = host.slice(0, end).toLowerCase();
    const suffix = this.#suffix;
    if (name.length <= suffix.length || !name.endsWith(suffix)) return undefined;
    const app = name.slice(0, name.length - suffix.length);
    if (this.#hostCache.size >= hostCacheLimit) this.#hostCache.clear();
    this.#hostCache.set(host, app);
    return app;
  }

  #onBatch(batch: ChangeBatch): void {
    if (!this.#index.apply(batch.revision, batch.changes) || this.#swapScheduled) return;
    // Coalesce a burst of batches into one rebuild after the current tick.
    this.#swapScheduled = true;
    setImmediate(this.#swap);
  }

  readonly #swap = (): void => {
    this.#swapScheduled = false;
    if (this.closing || !this.#index.rebuild()) return;
    this.#table = this.#index.table;
    this.#closeStalePools();
    this.#log.debug({ version: this.#table.version, revision: this.#table.revision, apps: this.#table.apps.size }, 'routing table swapped');
  };

  #closeStalePools(): void {
    if (this.#pools.size === 0) return;
    const live = new Set<string>();
    for (const route of this.#table.apps.values()) for (const b of route.backends) live.add(b.origin);
    for (const [origin, pool] of this.#pools) {
      if (live.has(origin)) continue;
      this.#pools.delete(origin);
      // close() lets requests already on the pool finish; only new requests are refused.
      pool.close().catch((err: unknown) => this.#log.warn({ origin, err: errorMessage(err) }, 'closing backend pool failed'));
    }
  }

  #onClientError(err: Error, socket: Socket): void {
    const code = errorCodeOf(err);
    const pending = (socket as Socket & { _httpMessage?: ServerResponse | null })._httpMessage;
    if (code === 'ECONNRESET' || !socket.writable || (pending && pending.headersSent)) {
      socket.destroy();
      return;
    }
    if (code === 'HPE_HEADER_OVERFLOW') sendClientError(socket, 'headers_too_large', 'request headers too large');
    else if (code === 'ERR_HTTP_REQUEST_TIMEOUT') sendClientError(socket, 'request_timeout', 'request not received in time');
    else sendClientError(socket, 'bad_request', 'bad request: the request could not be parsed');
  }

  async #close(): Promise<void> {
    this.closing = true;
    this.#unsubscribe();
    const server = this.#server;
    const serverClosed = new Promise<void>((resolve) => server.close(() => resolve()));
    server.closeIdleConnections();
    if (this.#inflight > 0) {
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve) => {
        this.#drained = resolve;
        timer = setTimeout(resolve, this.#t.drainMs);
      });
      clearTimeout(timer);
      if (this.#inflight > 0) this.#log.warn({ inflight: this.#inflight }, 'proxy drain timed out; cutting remaining requests');
    }
    server.closeAllConnections();
    const pools = [...this.#pools.values()];
    this.#pools.clear();
    await Promise.all(pools.map((p) => p.destroy().catch(() => undefined)));
    await serverClosed;
    this.#log.info({}, 'proxy closed');
  }
}

/** Round robin over an app's backends. */
function pick(route: AppRoute): Backend {
  const list = route.backends;
  let i = route.cursor;
  if (i >= list.length) i = 0;
  route.cursor = i + 1;
  return list[i]!;
}

function onResponseDrain(this: ProxyResponse): void {
  this.exchange?.resume?.();
}

/** Starts the proxy's HTTP listener with a routing table loaded from `catalog` and kept current from its changes. */
export async function startProxy(opts: ProxyOptions): Promise<RunningProxy> {
  const proxy = new HttpProxy(opts);
  await proxy.listen();
  return proxy;
}
