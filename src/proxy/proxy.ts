// The HTTP proxy: node:http in (and HTTP/2 on the TLS listener), one undici Pool per machine out (h2c where asked), routed by Host from the in-memory table.
import { channel } from 'node:diagnostics_channel';
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { createServer, request as httpRequest, IncomingMessage, ServerResponse, type ClientRequest, type Server } from 'node:http';
import { Http2ServerResponse, type Http2ServerRequest } from 'node:http2';
import type { Writable } from 'node:stream';
import type { Server as TlsServer, TLSSocket } from 'node:tls';
import type { AddressInfo, Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import { Pool, type Dispatcher } from 'undici';
import type { ChangeBatch } from '../catalog/index.ts';
import { TarmacError, errorMessage } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';
import { type ProxyErrorCode, sendClientError, sendProxyError, writeHeadRaw } from './errors.ts';
import { addForwarding, clientAddress, type ForwardingConstants, hopByHop, readRequestHead, type RequestHead, responseHeaders, withoutHeaders } from './headers.ts';
import { Autostarter, type AutostartOptions } from './autostart.ts';
import { type AppRoute, type Backend, RouteIndex, type RouteSource, type RoutingTable } from './routing.ts';
import { CertificateIndex } from './certificates.ts';
import { acmeHttpPrefix } from './acme-challenges.ts';
import { H2Exchange, H2Sessions } from './h2-backend.ts';
import { h2RequestHead } from './h2-request.ts';
import { BackhaulListener } from './backhaul.ts';
import { closeSoon } from './tcp.ts';
import { maxReplays, parseReplay, replaySource, replayTarget, type Replay } from './replay.ts';
import { TlsListener } from './tls.ts';
import { PortListeners } from './listeners.ts';

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
  /** How long a request waits for a machine below its hard concurrency limit before a 503. Default 10 s. */
  queueMs?: number;
  /** Idle time after which a UDP flow on an app address (a client's datagrams to one machine) is ended. Default 30 s. */
  udpIdleMs?: number;
}

/** Limits on what a client may send and how much may wait; every one has a default. */
export interface ProxyLimits {
  /** Most request header fields accepted (431 above). Default 100, like HAProxy's. */
  maxHeaders?: number;
  /** Requests of one app that may wait while every machine is at its hard limit (503 beyond). Default 100. */
  queuePerApp?: number;
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
  /** Region of this host, sent as Fly-Region; among equally loaded machines, those of this region are picked first. Default 'local'. */
  region?: string;
  /**
   * This host's id. With it, machines on other hosts that take backhaul are reached through their host's proxy
   * (which delivers to the machine the request names); without it every machine is connected to directly.
   */
  hostId?: string;
  /**
   * Where to take backhaul: requests other hosts' proxies forward to this host's machines. Their forwarding headers
   * are trusted, so bind it to an address only hosts reach (the private network), never to a public one.
   */
  backhaul?: { host: string; port: number };
  timeouts?: ProxyTimeouts;
  limits?: ProxyLimits;
  /**
   * Fly's auto_start_machines: a request for an app with no machine to take it (or every started one past its soft
   * limit) starts a stopped machine through this, and waits in the queue until it routes. Off without it.
   */
  autostart?: AutostartOptions;
  /**
   * The HTTPS listener: TLS 1.2/1.3 with the certificate picked by SNI from the catalog (a self-signed one for
   * `<app>.<appsDomain>`), HTTP/2 or HTTP/1.1 by ALPN, requests routed as on `http`. None without it.
   */
  https?: { host: string; port: number };
  /** Where self-signed certificates are kept across restarts; in memory only without it. */
  certificatesDir?: string;
  /**
   * Listen on apps' own addresses (ip_assignments) for their service ports other than 80/443: what an edge does.
   * Default true; a worker-only host sets false (it still takes those ports' backhaul tunnels).
   */
  appAddresses?: boolean;
  /**
   * The HTTP data plane in front of this proxy (HAProxy): requests carrying `tarmac-front: <key>` came through it, and
   * their `tarmac-client-ip` is the client's address and `port` the one the client connected to.
   */
  front?: { key: string; port: number };
}

export interface RunningProxy {
  readonly address: { host: string; port: number };
  /** The backhaul listener's address, when the proxy takes backhaul. */
  readonly backhaulAddress: { host: string; port: number } | undefined;
  /** The HTTPS listener's address, when the proxy has one. */
  readonly httpsAddress: { host: string; port: number } | undefined;
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
  /** Response body bytes relayed from the machine (0 for tunnels and the proxy's own answers). */
  readonly responseBytes: number;
}

const requestEvents = channel(proxyRequestChannel);

/** Name of the diagnostics channel carrying a ProxyQueueEvent whenever an app's queue grows or shrinks. */
export const proxyQueueChannel = 'tarmac:proxy:queue';

/** Published on `tarmac:proxy:queue`: how many requests of an app now wait for a machine below its hard limit. */
export interface ProxyQueueEvent {
  readonly app: string;
  readonly queued: number;
}

const queueEvents = channel(proxyQueueChannel);

function publishQueue(app: string, queued: number): void {
  if (queueEvents.hasSubscribers) queueEvents.publish({ app, queued } satisfies ProxyQueueEvent);
}

const defaults: Required<ProxyTimeouts> = {
  backendHeadersMs: 60_000,
  backendBodyMs: 300_000,
  backendConnectMs: 5_000,
  clientHeadersMs: 30_000,
  clientRequestMs: 300_000,
  keepAliveMs: 30_000,
  drainMs: 10_000,
  queueMs: 10_000,
  udpIdleMs: 30_000,
};

const defaultLimits: Required<ProxyLimits> = { maxHeaders: 100, queuePerApp: 100 };

/** The timeouts and limits a proxy has when its options leave them out. */
export const proxyDefaults: { readonly timeouts: Required<ProxyTimeouts>; readonly limits: Required<ProxyLimits> } = { timeouts: defaults, limits: defaultLimits };

/** Errors that say nothing about reaching a machine: never retried elsewhere. */
const notNetworkErrors: ReadonlySet<string> = new Set([
  'UND_ERR_INVALID_ARG', 'UND_ERR_NOT_SUPPORTED', 'UND_ERR_ABORTED', 'UND_ERR_REQ_CONTENT_LENGTH_MISMATCH',
]);

class ClientClosedError extends Error {
  override readonly name = 'ClientClosedError';
  readonly code = 'TARMAC_CLIENT_CLOSED';
}
const clientClosed = new ClientClosedError('the client closed the connection');

/** A machine too slow to answer, found by the proxy's shared sweep; its code is undici's for the same timeout. */
class BackendTimeoutError extends Error {
  override readonly name = 'BackendTimeoutError';
  constructor(readonly code: 'UND_ERR_HEADERS_TIMEOUT' | 'UND_ERR_BODY_TIMEOUT', message: string) {
    super(message);
  }
}
const headersTimedOut = new BackendTimeoutError('UND_ERR_HEADERS_TIMEOUT', 'the machine did not send response headers in time');
const bodyTimedOut = new BackendTimeoutError('UND_ERR_BODY_TIMEOUT', 'the machine paused its response body for too long');
/** Ends a machine's response that asked for a replay (fly-replay): the request went on to another machine. */
const replayed = new ClientClosedError('the request was replayed to another machine');
/** The header a replayed request carries (replaced on each replay). */
const replaySourceHeader: ReadonlySet<string> = new Set(['fly-replay-src']);

/** A response class with the per-request state the proxy needs added, so listeners can be shared functions. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any -- the mixin pattern needs a constructor of any arguments
function withRequestState<T extends new (...args: any[]) => object>(Base: T) {
  return class extends Base {
    exchange: Exchange | H2Exchange | null = null;
    /** Set while the request waits in its app's queue. */
    waiter: Waiter | null = null;
    requestId = '';
    host: string | undefined = undefined;
    app: string | undefined = undefined;
    /** Which machines may serve the request, when the request (or the backhaul) narrows them. */
    want: Want | undefined = undefined;
    startedAt = 0;
    errorCode: ProxyErrorCode | 'client_closed' | undefined = undefined;
  };
}

/** node:http's response (HTTP/1.1, plain or over TLS) with the proxy's per-request state. */
class ProxyResponse extends withRequestState(ServerResponse<IncomingMessage>) {}
/** node:http2's compatibility response (HTTP/2 clients of the TLS listener) with the same state. */
class ProxyH2Response extends withRequestState(Http2ServerResponse) {}
/** A response the proxy answers a client request with, either kind. */
export type ProxyRes = ProxyResponse | ProxyH2Response;
/** A client request, either kind. */
type ProxyReq = IncomingMessage | Http2ServerRequest;

function errorCodeOf(err: Error): string {
  const code = (err as { code?: unknown }).code;
  return typeof code === 'string' ? code : '';
}

/** Receives a response's fly-replay value from responseHeaders; one serves every response (it is read right after). */
const replayHolder: { value: string | undefined } = { value: undefined };

/** One client request forwarded to a machine: the undici dispatch handler, streaming both ways. */
class Exchange implements Dispatcher.DispatchHandler {
  attempts = 0;
  bytes = 0;
  connected = false;
  done = false;
  clientGone = false;
  drainListened = false;
  abort: ((err?: Error) => void) | null = null;
  resume: (() => void) | null = null;
  /** For the proxy's timeout sweep: response headers are in (the body timeout applies, not the headers one). */
  headersDone = false;
  /** For the sweep: the proxy's coarse clock when the exchange last made progress. */
  since = 0;
  /** For the sweep: the progress it last saw (request body bytes read before the headers, response bytes after). */
  progress = 0;
  /** The proxy's list of exchanges under the sweep (intrusive: no allocation per request). */
  watched = false;
  prevWatched: Exchange | null = null;
  nextWatched: Exchange | null = null;

  constructor(
    readonly proxy: HttpProxy,
    readonly req: ProxyReq,
    readonly res: ProxyRes,
    readonly app: string,
    /** Acquired by the caller (counted in its `inflight`); released when the response closes. */
    public backend: Backend,
    readonly path: string,
    readonly headers: string[],
    readonly hasBody: boolean,
  ) {}

  /** Replays this request already went through (fly-replay). */
  replays = 0;

  /** Sends the request on to the machine a `fly-replay` value names; false when it names none (the response is relayed). */
  #replay(value: string): boolean {
    const r = parseReplay(value);
    if (r === undefined) return false;
    const { proxy, res } = this;
    const from = this.backend;
    const next = proxy.pickReplay(this.app, r, from);
    this.done = true;
    proxy.unwatch(this);
    this.abort?.(replayed);
    proxy.release(from);
    if (next === undefined) {
      res.errorCode = 'no_machine';
      const target = r.instance !== undefined ? `machine ${r.instance}` : r.region !== undefined ? `machine in region ${r.region}` : 'other machine';
      sendProxyError(res, 'no_machine', `the app asked to replay the request (fly-replay) but no ${target} of app ${this.app} can take it`, res.requestId);
      return true;
    }
    const headers = withoutHeaders(this.headers, replaySourceHeader);
    headers.push('fly-replay-src', replaySource(from, r));
    const ex = newExchange(proxy, this.req, res, this.app, next, this.path, headers, false);
    if (ex instanceof Exchange) ex.replays = this.replays + 1;
    ex.attempts = this.attempts;
    res.exchange = ex;
    ex.send();
    return true;
  }

  send(): void {
    this.attempts++;
    this.connected = false;
    this.abort = null;
    this.headersDone = false;
    this.since = this.proxy.clock;
    this.progress = this.hasBody ? bytesReadOf(this.req) : 0;
    this.proxy.watch(this);
    const b = this.backend;
    const opts: Dispatcher.DispatchOptions & { servername: string } = {
      path: this.path,
      method: this.req.method ?? 'GET',
      headers: b.via === undefined ? this.headers : [...this.headers, 'fly-force-instance-id', b.machineId],
      body: this.hasBody ? this.req : null,
      // Without one, undici derives a TLS server name from the Host header on every request (two IP regexes);
      // machines are reached over plain HTTP, where it is never used (undici reads it; its types omit it).
      servername: b.address,
    };
    this.proxy.poolFor(b).dispatch(opts, this);
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
    this.headersDone = true;
    this.since = this.proxy.clock;
    this.progress = 0;
    const res = this.res;
    // fly-replay is acted on by the proxy that chose the machine (not a worker delivering backhaul), for requests
    // without a body (nothing of it is consumed yet), a few times at most.
    let replay: typeof replayHolder | undefined;
    if (!this.hasBody && this.replays < maxReplays && res.want?.local !== true) {
      replayHolder.value = undefined;
      replay = replayHolder;
    }
    const headers = responseHeaders(rawHeaders, res.requestId, replay);
    const replayTo = replay?.value;
    if (replayTo !== undefined && this.#replay(replayTo)) return false;
    if (this.proxy.closing && res instanceof ProxyResponse) res.shouldKeepAlive = false;
    try {
      // HTTP/2 has no reason phrase.
      if (statusText && res instanceof ProxyResponse) res.writeHead(statusCode, statusText, headers);
      else writeHeadRaw(res, statusCode, headers);
    } catch (err) {
      // A header node:http refuses to send: treat it as a broken response.
      this.abort?.(err as Error);
      return false;
    }
    return true;
  }

  onData(chunk: Buffer): boolean {
    this.bytes += chunk.length;
    const res: Writable = this.res;
    if (res.write(chunk)) return true;
    // Backpressure: resume the machine's body when the client drains (listened for only once it is needed).
    if (!this.drainListened) {
      this.drainListened = true;
      this.res.on('drain', onResponseDrain);
    }
    return false;
  }

  onComplete(): void {
    if (this.done) return;
    this.done = true;
    this.proxy.unwatch(this);
    this.res.end();
  }

  /** Called by the proxy's sweep when the machine took too long: ends the exchange as undici's own timeout would. */
  timeOut(err: BackendTimeoutError): void {
    // Before it is connected, the connect timeout applies.
    if (this.connected) this.abort?.(err);
  }

  onError(err: Error): void {
    if (this.done) return;
    const res = this.res;
    if (this.clientGone) {
      this.done = true;
      this.proxy.unwatch(this);
      return;
    }
    const code = errorCodeOf(err);
    const unreachable = !this.connected && !notNetworkErrors.has(code);
    if (unreachable && this.attempts < 2) {
      const next = this.proxy.pickOther(this.app, this.backend, this.res.want);
      if (next !== undefined) {
        this.proxy.release(this.backend);
        this.backend = next;
        this.send();
        return;
      }
    }
    if (unreachable && this.proxy.retryWarming(this.backend, () => this.send())) return;
    this.done = true;
    this.proxy.unwatch(this);
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

/** An Upgrade request (WebSocket): forwarded with its head to a machine, then both sockets spliced until either closes. */
class Tunnel {
  readonly requestId: string;
  readonly startedAt = performance.now();
  host: string | undefined = undefined;
  app: string | undefined = undefined;
  backend: Backend | undefined = undefined;
  attempts = 0;
  status = 0;
  error: ProxyErrorCode | 'client_closed' | undefined = undefined;
  #waiter: Waiter | undefined = undefined;
  #upReq: ClientRequest | undefined = undefined;
  #upstream: Socket | undefined = undefined;
  #clientOpen = true;
  #upstreamOpen = false;
  #finished = false;
  #path = '/';
  #headers: string[] = [];
  #want: Want | undefined = undefined;
  readonly #requestHead: RequestHead;

  constructor(readonly proxy: HttpProxy, readonly req: IncomingMessage, readonly client: Socket, readonly head: Buffer, readonly backhaul: boolean) {
    this.#requestHead = readRequestHead(req.rawHeaders, backhaul);
    this.requestId = (backhaul ? this.#requestHead.requestId : undefined) ?? proxy.nextRequestId();
    client.on('error', () => client.destroy());
    client.on('close', () => {
      this.#clientOpen = false;
      if (this.#waiter !== undefined) {
        proxy.dequeue(this.#waiter);
        this.#waiter = undefined;
      }
      if (this.status === 0 && this.error === undefined) this.error = 'client_closed';
      if (this.#upstream !== undefined) closeSoon(this.#upstream);
      else this.#upReq?.destroy();
      this.#maybeFinish();
    });
  }

  begin(): void {
    const { proxy, req } = this;
    const head = this.#requestHead;
    this.host = head.host;
    if (proxy.closing) return this.#fail('shutting_down', 'the proxy is shutting down; retry');
    const a = proxy.admit(req, head, this.backhaul);
    if (!a.ok) {
      this.app = a.app;
      return this.#fail(a.code, a.message);
    }
    this.app = a.route.app;
    if (head.hasBody) return this.#fail('bad_request', 'bad request: an Upgrade request cannot carry a body');
    this.#path = a.path;
    this.#want = a.want;
    const headers = head.headers;
    if (!this.backhaul) addForwarding(headers, proxy.clientIpOf(head, this.client), head.forwardedFor, this.requestId, proxy.forwardingOf(this.client, head));
    headers.push('connection', 'upgrade', 'upgrade', req.headers.upgrade ?? '');
    this.#headers = headers;
    const w: Waiter = {
      app: a.route.app,
      want: a.want,
      timer: undefined,
      start: (b) => {
        this.#waiter = undefined;
        this.#connect(b);
      },
      fail: (code, message) => {
        this.#waiter = undefined;
        this.#fail(code, message);
      },
    };
    this.#waiter = w;
    proxy.dispatch(a.route, w);
  }

  /** Cuts both sides now (the drain timeout ran out). */
  destroy(): void {
    this.#upReq?.destroy();
    this.#upstream?.destroy();
    this.client.destroy();
  }

  #connect(b: Backend): void {
    if (!this.#clientOpen) {
      // The client left while this backend was being handed over: give it back.
      if (this.#finished) this.proxy.release(b);
      else {
        this.backend = b;
        this.#maybeFinish();
      }
      return;
    }
    this.backend = b;
    this.attempts++;
    const t = this.proxy.timeouts;
    const headers = b.via === undefined ? this.#headers : [...this.#headers, 'fly-force-instance-id', b.machineId];
    const up = httpRequest({
      host: b.address, port: b.port, method: this.req.method ?? 'GET', path: this.#path, headers, setHost: false, agent: false,
    });
    this.#upReq = up;
    let connected = false;
    let timedOut = false;
    let timer = setTimeout(() => {
      timedOut = true;
      up.destroy();
    }, t.backendConnectMs);
    up.on('socket', (s: Socket) => s.once('connect', () => {
      connected = true;
      clearTimeout(timer);
      timer = setTimeout(() => {
        timedOut = true;
        up.destroy();
      }, t.backendHeadersMs);
    }));
    up.on('upgrade', (res: IncomingMessage, socket: Socket, upHead: Buffer) => {
      clearTimeout(timer);
      this.#splice(res, socket, upHead);
    });
    up.on('response', (res: IncomingMessage) => {
      clearTimeout(timer);
      this.#refused(up, res);
    });
    up.on('error', () => {
      clearTimeout(timer);
      if (this.#upReq !== up || !this.#clientOpen || this.status !== 0) return;
      if (!connected && this.attempts < 2 && this.app !== undefined) {
        const next = this.proxy.pickOther(this.app, b, this.#want);
        if (next !== undefined) {
          this.proxy.release(b);
          this.#connect(next);
          return;
        }
      }
      if (!connected) this.#fail('backend_unreachable', `could not reach a machine of app ${this.app ?? ''}`);
      else if (timedOut) this.#fail('backend_timeout', `a machine of app ${this.app ?? ''} did not answer in time`);
      else this.#fail('backend_error', `a machine of app ${this.app ?? ''} closed the connection or sent an invalid response`);
    });
    up.end();
  }

  /** The machine switched protocols: relay its 101 and splice the two sockets. */
  #splice(res: IncomingMessage, upstream: Socket, upHead: Buffer): void {
    const client = this.client;
    this.#upstream = upstream;
    this.#upstreamOpen = true;
    upstream.on('error', () => {
      upstream.destroy();
      client.destroy();
    });
    upstream.on('close', () => {
      this.#upstreamOpen = false;
      closeSoon(client);
      this.#maybeFinish();
    });
    if (!this.#clientOpen) {
      upstream.destroy();
      return;
    }
    this.status = res.statusCode ?? 101;
    let out = `HTTP/1.1 ${this.status} ${res.statusMessage ?? ''}\r\n`;
    const raw = res.rawHeaders;
    for (let i = 0; i < raw.length; i += 2) out += `${raw[i]}: ${raw[i + 1]}\r\n`;
    out += `fly-request-id: ${this.requestId}\r\nvia: 1.1 tarmac\r\n\r\n`;
    client.write(out);
    if (upHead.length > 0) client.write(upHead);
    if (this.head.length > 0) upstream.write(this.head);
    upstream.setNoDelay(true);
    client.setNoDelay(true);
    upstream.pipe(client);
    client.pipe(upstream);
  }

  /** The machine answered without switching protocols: relay that answer and close. */
  #refused(up: ClientRequest, res: IncomingMessage): void {
    const client = this.client;
    this.status = res.statusCode ?? 502;
    let out = `HTTP/1.1 ${this.status} ${res.statusMessage ?? ''}\r\n`;
    const raw = res.rawHeaders;
    for (let i = 0; i < raw.length; i += 2) {
      if (!hopByHop.has(raw[i]!.toLowerCase())) out += `${raw[i]}: ${raw[i + 1]}\r\n`;
    }
    out += `fly-request-id: ${this.requestId}\r\nvia: 1.1 tarmac\r\nconnection: close\r\n\r\n`;
    client.write(out);
    res.on('error', () => client.destroy());
    res.on('end', () => up.destroy());
    res.pipe(client);
  }

  #fail(code: ProxyErrorCode, message: string): void {
    this.error = code;
    if (this.#clientOpen && !this.client.destroyed) sendClientError(this.client, code, message, this.requestId);
    if (this.#clientOpen) closeSoon(this.client);
  }

  #maybeFinish(): void {
    if (this.#finished || this.#clientOpen || this.#upstreamOpen) return;
    this.#finished = true;
    if (this.backend !== undefined) this.proxy.release(this.backend);
    if (requestEvents.hasSubscribers) {
      const event: ProxyRequestEvent = {
        requestId: this.requestId,
        method: this.req.method ?? '',
        host: this.host,
        app: this.app,
        machineId: this.backend?.machineId,
        status: this.status,
        error: this.error,
        attempts: this.attempts,
        durationMs: performance.now() - this.startedAt,
        responseBytes: 0,
      };
      requestEvents.publish(event);
    }
    this.proxy.tunnelDone(this);
  }
}


/** Most hosts repeat: their parsed app name is cached, up to this many distinct Host values. */
const hostCacheLimit = 10_000;

class HttpProxy implements RunningProxy {
  closing = false;
  readonly #opts: ProxyOptions;
  readonly #t: Required<ProxyTimeouts>;
  readonly #limits: Required<ProxyLimits>;
  readonly #log: Logger;
  /** Requests waiting, per app, for a machine below its hard limit; oldest first. */
  readonly #queues = new Map<string, Waiter[]>();
  readonly #tunnels = new Set<Tunnel>();
  readonly #index: RouteIndex;
  #table: RoutingTable;
  readonly #pools = new Map<string, Pool>();
  readonly #poolOptions: Pool.Options;
  readonly #server: Server<typeof IncomingMessage, typeof ProxyResponse>;
  /** The backhaul listener (requests other hosts' proxies forward), when configured. */
  readonly #backhaul: Server<typeof IncomingMessage, typeof ProxyResponse> | undefined;
  /** Accepts backhaul connections for #backhaul (HTTP/1.1) or its own h2c server. */
  readonly #backhaulListener: BackhaulListener | undefined;
  #backhaulAddress: { host: string; port: number } | undefined;
  readonly #unsubscribe: () => void;
  readonly #autostart: Autostarter | undefined;
  readonly #suffix: string;
  /** Host header value → app name, for valid hosts that name an app. */
  readonly #hostCache = new Map<string, string>();
  readonly #fwd: ForwardingConstants;
  /** The same for requests that came over TLS (X-Forwarded-Proto https, the HTTPS port). */
  readonly #fwdTls: ForwardingConstants;
  /** Forwarding constants of requests the data plane in front sent (`front`), and its key. */
  readonly #fwdFront: ForwardingConstants | undefined;
  readonly #frontKey: Buffer | undefined;
  /** Custom certificates by host name (routing and SNI) and the self-signed defaults. */
  readonly #certs: CertificateIndex;
  /** Listeners on apps' own addresses (their non-HTTP service ports). */
  readonly #ports: PortListeners;
  /** The HTTPS listener's TLS server, which also takes `tls` + `http` connections of app addresses. */
  #tlsServer: TlsServer | undefined;
  readonly #tls: TlsListener | undefined;
  #httpsAddress: { host: string; port: number } | undefined;
  /** h2c sessions to machines whose service asks for it. */
  readonly h2Sessions: H2Sessions;
  /** This host's region: among equally loaded machines, the proxy picks one there first. */
  readonly #near: string;
  readonly #idPrefix = randomBytes(6).toString('hex');
  readonly #idSuffix: string;
  #seq = 0;
  #swapScheduled = false;
  #inflight = 0;
  #drained: (() => void) | null = null;
  #closed: Promise<void> | null = null;
  #address: { host: string; port: number } = { host: '', port: 0 };
  /**
   * Exchanges waiting on a machine (a linked list through them), which one shared sweep checks against the backend
   * headers and body timeouts. undici's own timers for them are off: it allocated two per request, and they outlived
   * the requests (it drops cleared ones only every half second), so every scavenge copied them and many were promoted
   * to the old generation. A Set in their place cost as much again (its tables churn and it holds young objects).
   */
  #watched: Exchange | null = null;
  #sweepTimer: NodeJS.Timeout | undefined;
  /** Coarse time (performance.now() at the last sweep), what exchanges note instead of reading the clock. */
  clock = performance.now();
  /** One shared 'close' listener for every response (`this` is the response), so no closure per request. */
  readonly #onResponseClose: (this: ProxyRes) => void;

  constructor(opts: ProxyOptions) {
    this.#opts = opts;
    const proxy = this;
    this.#onResponseClose = function onResponseClose(this: ProxyRes) { proxy.#responseClosed(this); };
    this.#t = { ...defaults, ...opts.timeouts };
    this.#limits = { ...defaultLimits, ...opts.limits };
    this.#log = opts.log.child({ component: 'proxy' });
    this.#suffix = `.${(opts.appsDomain ?? 'localhost').toLowerCase().replace(/^\.+|\.+$/g, '')}`;
    const region = opts.region ?? 'local';
    this.#fwd = { port: String(opts.http.port), region, proto: 'http' };
    this.#fwdTls = { port: String(opts.https?.port ?? 0), region, proto: 'https' };
    this.#fwdFront = opts.front === undefined ? undefined : { port: String(opts.front.port), region, proto: 'http' };
    this.#frontKey = opts.front === undefined ? undefined : Buffer.from(opts.front.key);
    this.#near = region;
    this.#idSuffix = `-${region}`;
    this.#poolOptions = {
      pipelining: 1,
      // The proxy's sweep enforces backendHeadersMs and backendBodyMs (see #watched).
      headersTimeout: 0,
      bodyTimeout: 0,
      connectTimeout: this.#t.backendConnectMs,
      keepAliveTimeout: 4_000,
    };

    // Load, then subscribe, in one synchronous step: no batch can fall between the two.
    this.#index = new RouteIndex(opts.catalog, opts.hostId);
    this.#certs = new CertificateIndex({ source: opts.catalog, appsDomain: opts.appsDomain ?? 'localhost', dir: opts.certificatesDir, log: this.#log });
    this.#autostart = opts.autostart === undefined ? undefined : new Autostarter(opts.autostart, region, this.#log);
    this.#table = this.#index.table;
    this.#unsubscribe = opts.catalog.subscribe((batch) => this.#onBatch(batch));

    this.#ports = new PortListeners({
      log: this.#log, listen: opts.appAddresses !== false, choose: (backends, exclude) => choose(backends, this.#near, exclude), certificates: this.#certs,
      appExists: (app) => this.#table.apps.has(app), connectMs: this.#t.backendConnectMs, handshakeMs: this.#t.clientHeadersMs, udpIdleMs: this.#t.udpIdleMs,
      http: (socket, tls) => {
        if (!tls) this.#server.emit('connection', socket);
        else if (this.#tlsServer !== undefined) this.#tlsServer.emit('connection', socket);
        else socket.destroy(); // tls + http on an app address needs the HTTPS listener
      },
    });
    this.#server = this.#createServer(false);
    this.#backhaul = opts.backhaul === undefined ? undefined : this.#createServer(true);
    this.#backhaulListener = this.#backhaul === undefined ? undefined : new BackhaulListener({
      http1: this.#backhaul,
      onRequest: (req, res) => this.#onRequest(req, res as ProxyH2Response, true),
      responseClass: ProxyH2Response,
      idleMs: this.#t.keepAliveMs,
      maxHeaders: this.#limits.maxHeaders,
    });
    this.h2Sessions = new H2Sessions(this.#t.backendConnectMs, this.#log);
    this.#tls = opts.https === undefined ? undefined : new TlsListener({
      certificates: this.#certs,
      appExists: (app) => this.#table.apps.has(app),
      http1: this.#server,
      onRequest: (req, res) => this.#onRequest(req, res as ProxyH2Response, false),
      responseClass: ProxyH2Response,
      handshakeMs: this.#t.clientHeadersMs,
      idleMs: this.#t.keepAliveMs,
      maxHeaders: this.#limits.maxHeaders,
      log: this.#log,
    });
  }

  /** An HTTP server with the proxy's timeouts and limits; `backhaul` ones take requests other hosts' proxies forward. */
  #createServer(backhaul: boolean): Server<typeof IncomingMessage, typeof ProxyResponse> {
    const t = this.#t;
    const clientRequestMs = t.clientRequestMs > 0 ? Math.max(t.clientRequestMs, t.clientHeadersMs) : 0;
    const server = createServer<typeof IncomingMessage, typeof ProxyResponse>({
      ServerResponse: ProxyResponse,
      headersTimeout: t.clientHeadersMs,
      requestTimeout: clientRequestMs,
      connectionsCheckingInterval: Math.max(100, Math.min(t.clientHeadersMs / 4, 5_000)),
      requireHostHeader: true,
      noDelay: true,
    }, (req, res) => this.#onRequest(req, res, backhaul));
    server.keepAliveTimeout = t.keepAliveMs;
    // One more than the limit, so a request over it is seen (node:http silently drops fields past its count).
    server.maxHeadersCount = this.#limits.maxHeaders + (this.#frontKey === undefined ? 1 : 3);
    server.on('clientError', (err: Error, socket: Socket) => this.#onClientError(err, socket));
    server.on('upgrade', (req: IncomingMessage, socket: Socket, head: Buffer) => this.#onUpgrade(req, socket, head, backhaul));
    if (backhaul) server.on('connect', (req: IncomingMessage, socket: Socket, head: Buffer) => this.#ports.acceptTunnel(req, socket, head));
    return server;
  }

  get address(): { host: string; port: number } {
    return this.#address;
  }

  get backhaulAddress(): { host: string; port: number } | undefined {
    return this.#backhaulAddress;
  }

  get httpsAddress(): { host: string; port: number } | undefined {
    return this.#httpsAddress;
  }

  get routes(): RoutingTable {
    return this.#table;
  }

  async listen(): Promise<void> {
    this.#address = await listenOn(this.#server, this.#opts.http, 'the proxy');
    this.#fwd.port = String(this.#address.port);
    this.#server.on('error', (err) => this.#log.error({ err }, 'proxy server error'));
    if (this.#backhaulListener !== undefined) {
      const server = this.#backhaulListener.server;
      try {
        this.#backhaulAddress = await listenOn(server, this.#opts.backhaul!, 'the proxy\'s backhaul');
      } catch (err) {
        this.#server.close();
        throw err;
      }
      server.on('error', (err) => this.#log.error({ err }, 'proxy backhaul server error'));
    }
    if (this.#tls !== undefined) {
      try {
        const server = this.#tls.start(await this.#certs.defaultPem());
        this.#tlsServer = server;
        this.#httpsAddress = await listenOn(server, this.#opts.https!, 'the proxy\'s HTTPS listener');
        server.on('error', (err) => this.#log.error({ err }, 'proxy TLS server error'));
      } catch (err) {
        this.#server.close();
        this.#backhaulListener?.server.close();
        throw err;
      }
      this.#fwdTls.port = String(this.#httpsAddress.port);
    }
    const signal = this.#opts.signal;
    if (signal) {
      if (signal.aborted) void this.close();
      else signal.addEventListener('abort', () => void this.close(), { once: true });
    }
    this.#ports.update(this.#table);
    this.#startSweep();
    this.#log.info({ address: this.#address, backhaul: this.#backhaulAddress, https: this.#httpsAddress, apps: this.#table.apps.size }, 'proxy listening');
  }

  close(): Promise<void> {
    return (this.#closed ??= this.#close());
  }

  /** Starts the timeout sweep, often enough that a timeout fires within a quarter of itself late (and 10 ms at best). */
  #startSweep(): void {
    const { backendHeadersMs: h, backendBodyMs: b } = this.#t;
    const shortest = Math.min(h > 0 ? h : Infinity, b > 0 ? b : Infinity);
    if (shortest === Infinity || this.closing) return;
    const every = Math.min(1_000, Math.max(10, shortest / 4));
    this.clock = performance.now();
    // An exchange notes the clock of the last sweep: it may be `every` old, so a timeout counts that much extra.
    const headersMs = h > 0 ? h + every : Infinity;
    const bodyMs = b > 0 ? b + every : Infinity;
    this.#sweepTimer = setInterval(() => {
      const now = (this.clock = performance.now());
      for (let ex = this.#watched, next: Exchange | null; ex !== null; ex = next) {
        next = ex.nextWatched; // timeOut() unwatches ex
        if (ex.done) {
          this.unwatch(ex);
        } else if (!ex.headersDone) {
          // A request body still flowing to the machine keeps its headers timeout from starting (as in undici).
          const read = ex.hasBody ? bytesReadOf(ex.req) : 0;
          if (read !== ex.progress) {
            ex.progress = read;
            ex.since = now;
          } else if (now - ex.since > headersMs) ex.timeOut(headersTimedOut);
        } else if (ex.bytes !== ex.progress) {
          ex.progress = ex.bytes;
          ex.since = now;
        } else if (now - ex.since > bodyMs) ex.timeOut(bodyTimedOut);
      }
    }, every);
    this.#sweepTimer.unref();
  }

  /** Puts an exchange under the timeout sweep (again, for a retry). */
  watch(ex: Exchange): void {
    if (ex.watched) return;
    ex.watched = true;
    ex.prevWatched = null;
    ex.nextWatched = this.#watched;
    if (this.#watched !== null) this.#watched.prevWatched = ex;
    this.#watched = ex;
  }

  /** Takes a finished exchange out of the timeout sweep. */
  unwatch(ex: Exchange): void {
    if (!ex.watched) return;
    ex.watched = false;
    if (ex.prevWatched === null) this.#watched = ex.nextWatched;
    else ex.prevWatched.nextWatched = ex.nextWatched;
    if (ex.nextWatched !== null) ex.nextWatched.prevWatched = ex.prevWatched;
    ex.prevWatched = null;
    ex.nextWatched = null;
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

  get timeouts(): Required<ProxyTimeouts> {
    return this.#t;
  }

  /** The forwarding constants for a request: its listener's port and scheme (the data plane's, for a request it sent). */
  forwardingOf(socket: Socket, head: RequestHead): ForwardingConstants {
    if (head.front !== undefined && this.#fromFront(head)) return this.#fwdFront!;
    return (socket as TLSSocket).encrypted ? this.#fwdTls : this.#fwd;
  }

  /** The client's address: the socket's, or the one the data plane in front reports for a request it sent. */
  clientIpOf(head: RequestHead, socket: Socket): string {
    if (head.front !== undefined && head.frontClient !== undefined && this.#fromFront(head)) return head.frontClient;
    return clientAddress(socket.remoteAddress);
  }

  /** True when the request's `tarmac-front` is the data plane's key (compared in constant time). */
  #fromFront(head: RequestHead): boolean {
    const key = this.#frontKey;
    if (key === undefined || head.front === undefined) return false;
    const given = Buffer.from(head.front);
    return given.length === key.length && timingSafeEqual(given, key);
  }

  /** Another backend of the app below its hard limit, for a retry after a connect failure; acquired (counted) when found. */
  pickOther(app: string, failed: Backend, want: Want | undefined): Backend | undefined {
    if (want?.only !== undefined) return undefined; // the one machine asked for failed
    const route = this.#table.apps.get(app);
    if (route === undefined) return undefined;
    const b = choose(route.backends, this.#near, failed);
    if (b !== undefined) b.inflight++;
    return b;
  }

  /** The backend a request gets now (not yet counted), honouring what it asks for; undefined when all are at their limit. */
  pick(backends: readonly Backend[], want: Want | undefined): Backend | undefined {
    if (want === undefined) return choose(backends, this.#near);
    if (want.only !== undefined) {
      for (const b of backends) {
        if (b.machineId === want.only && b.inflight < b.hardLimit && (!want.local || b.via === undefined)) return b;
      }
      return undefined;
    }
    const inRegion = want.region === undefined ? undefined : choose(backends.filter((b) => b.region === want.region));
    return inRegion ?? choose(backends, this.#near);
  }

  /** True when `b` was autostarted moments ago and a refused connection to it is tried again later (`again`). */
  retryWarming(b: Backend, again: () => void): boolean {
    return this.#autostart !== undefined && !this.closing && this.#autostart.retryWarming(b, again);
  }

  /** The machine a fly-replay sends a request to, acquired (counted) when found. */
  pickReplay(app: string, r: Replay, from: Backend): Backend | undefined {
    const route = this.#table.apps.get(app);
    const b = route === undefined ? undefined : replayTarget(route.backends, r, from);
    if (b !== undefined) b.inflight++;
    return b;
  }

  /** Gives back a backend's slot; a request of its app waiting in the queue may take it. */
  release(b: Backend): void {
    b.inflight--;
    if (this.#queues.size !== 0 && this.#queues.has(b.app)) this.#drainQueue(b.app);
  }

  nextRequestId(): string {
    return `${this.#idPrefix}${(++this.#seq).toString(36)}${this.#idSuffix}`;
  }

  /**
   * Checks what routing relies on and finds the app: one Host, a valid one, a request target in origin form (or an
   * absolute form naming the same host, forwarded in origin form), a bounded header count; and the machine it names
   * (Fly-Force-Instance-Id), which over the backhaul must be one of this host's.
   */
  admit(req: ProxyReq, head: RequestHead, backhaul = false): Admission {
    if (head.invalid !== undefined) return { ok: false, code: 'bad_request', message: `bad request: ${head.invalid}` };
    // The data plane in front adds its two fields (tarmac-front, tarmac-client-ip).
    if (req.rawHeaders.length > (this.#limits.maxHeaders + (head.front === undefined ? 0 : 2)) * 2) {
      return { ok: false, code: 'headers_too_large', message: `too many request header fields (the limit is ${this.#limits.maxHeaders})` };
    }
    // On an app's own address and port the app is known; elsewhere the Host names it.
    const app = this.#ports.httpAppOf(req.socket) ?? (head.host === undefined ? undefined : this.#appOf(head.host));
    if (app === false) return { ok: false, code: 'bad_request', message: 'bad request: invalid Host header' };
    let path = req.url ?? '/';
    if (path.charCodeAt(0) !== 47 /* / */) {
      const m = absoluteForm.exec(path);
      if (m === null) return { ok: false, code: 'bad_request', message: 'bad request: the request target must be a path or an absolute http URI' };
      if (head.host === undefined || m[1]!.toLowerCase() !== head.host.toLowerCase()) {
        return { ok: false, code: 'bad_request', message: 'bad request: the request target names a different host than the Host header' };
      }
      path = m[2] === '' ? '/' : m[2]!;
      if (path.charCodeAt(0) === 63 /* ? */) path = `/${path}`;
    }
    const route = app === undefined ? undefined : this.#table.apps.get(app);
    if (route === undefined) return { ok: false, code: 'app_not_found', message: `no app is served at host ${head.host ?? '(none)'}` };
    if (route.backends.length === 0 && this.#autostart?.canStart(route.app) !== true) {
      return { ok: false, code: 'no_machine', message: `no started machine can serve app ${route.app}`, app: route.app };
    }
    if (head.forceInstance === undefined && head.preferRegion === undefined && !backhaul) return { ok: true, route, path, want: undefined };
    if (backhaul && head.forceInstance === undefined) {
      return { ok: false, code: 'bad_request', message: 'bad request: a backhaul request must name its machine in Fly-Force-Instance-Id', app: route.app };
    }
    const only = head.forceInstance;
    if (only !== undefined && !route.backends.some((b) => b.machineId === only && (!backhaul || b.via === undefined))) {
      return { ok: false, code: 'no_machine', message: `machine ${only} of app ${route.app} is not started here or does not exist`, app: route.app };
    }
    return { ok: true, route, path, want: { only, region: head.preferRegion, local: backhaul } };
  }

  /** Starts `w` on the least-loaded backend of `app` it may use, or queues it while every such backend is at its hard limit. */
  dispatch(route: AppRoute, w: Waiter): void {
    const b = this.pick(route.backends, w.want);
    if (b !== undefined) {
      if (b.inflight >= b.softLimit && w.want === undefined) this.#autostart?.demand(route, 0);
      b.inflight++;
      w.start(b);
      return;
    }
    let q = this.#queues.get(route.app);
    if (q === undefined) this.#queues.set(route.app, (q = []));
    if (q.length >= this.#limits.queuePerApp) {
      if (q.length === 0) this.#queues.delete(route.app);
      w.fail('over_capacity', `every machine of app ${route.app} is at its hard concurrency limit and ${this.#limits.queuePerApp} requests already wait; retry later, add machines or raise services.concurrency.hard_limit`);
      return;
    }
    q.push(w);
    publishQueue(route.app, q.length);
    if (w.want?.only === undefined) this.#autostart?.demand(route, q.length);
    w.timer = setTimeout(() => {
      this.dequeue(w);
      w.fail('over_capacity', route.backends.length === 0
        ? `no machine of app ${route.app} was ready within the ${this.#t.queueMs} ms the request waited for one to start; retry later`
        : `every machine of app ${route.app} stayed at its hard concurrency limit for the ${this.#t.queueMs} ms the request waited; retry later, add machines or raise services.concurrency.hard_limit`);
    }, this.#t.queueMs);
  }

  /** Removes a waiter from its queue (it timed out, or its client left). */
  dequeue(w: Waiter): void {
    clearTimeout(w.timer);
    w.timer = undefined;
    const q = this.#queues.get(w.app);
    if (q === undefined) return;
    const i = q.indexOf(w);
    if (i === -1) return;
    q.splice(i, 1);
    if (q.length === 0) this.#queues.delete(w.app);
    publishQueue(w.app, q.length);
  }

  #drainQueue(app: string): void {
    const q = this.#queues.get(app);
    if (q === undefined) return;
    const route = this.#table.apps.get(app);
    if (route === undefined || (route.backends.length === 0 && this.#autostart?.starting(app) !== true)) {
      this.#queues.delete(app);
      publishQueue(app, 0);
      for (const w of q) {
        clearTimeout(w.timer);
        w.fail('no_machine', `no started machine can serve app ${app}`);
      }
      return;
    }
    const before = q.length;
    // Oldest first; a waiter that asks for a machine still at its limit lets the ones behind it go ahead.
    for (let i = 0; i < q.length;) {
      const w = q[i]!;
      const b = this.pick(route.backends, w.want);
      if (b === undefined) {
        if (w.want === undefined) break; // nothing is free for anyone
        i++;
        continue;
      }
      q.splice(i, 1);
      clearTimeout(w.timer);
      w.timer = undefined;
      b.inflight++;
      w.start(b);
    }
    if (q.length === 0 && this.#queues.get(app) === q) this.#queues.delete(app);
    if (q.length !== before) publishQueue(app, q.length);
  }

  /** Accounting shared by requests and tunnels when one is done. */
  settled(): void {
    this.#inflight--;
    if (this.closing) {
      this.#server.closeIdleConnections();
      this.#backhaul?.closeIdleConnections();
      if (this.#inflight === 0) this.#drained?.();
    }
  }

  tunnelDone(t: Tunnel): void {
    this.#tunnels.delete(t);
    this.settled();
  }

  #onRequest(req: ProxyReq, res: ProxyRes, backhaul: boolean): void {
    // ACME HTTP-01 validation of a host name with an order pending (any edge answers it); a string compare otherwise.
    if (!backhaul && req.url?.startsWith(acmeHttpPrefix) === true && this.#certs.challenges.answerHttp(req.headers.host, req.url, res)) return;
    this.#inflight++;
    res.startedAt = performance.now();
    res.on('close', this.#onResponseClose);
    let head: RequestHead;
    if (res instanceof ProxyResponse) {
      if (this.closing) res.shouldKeepAlive = false;
      head = readRequestHead(req.rawHeaders, backhaul);
    } else {
      head = h2RequestHead(req as Http2ServerRequest, backhaul);
    }
    const requestId = (backhaul ? head.requestId : undefined) ?? this.nextRequestId();
    res.requestId = requestId;
    res.host = head.host;
    const a = this.admit(req, head, backhaul);
    if (!a.ok) {
      res.app = a.app;
      res.errorCode = a.code;
      sendProxyError(res, a.code, a.message, requestId);
      return;
    }
    const route = a.route;
    res.app = route.app;
    res.want = a.want;
    if (!backhaul) addForwarding(head.headers, this.clientIpOf(head, req.socket), head.forwardedFor, requestId, this.forwardingOf(req.socket, head));
    const b = this.pick(route.backends, a.want);
    if (b !== undefined) {
      // The common case: no closure or waiter per request.
      if (b.inflight >= b.softLimit && a.want === undefined) this.#autostart?.demand(route, 0);
      b.inflight++;
      startExchange(this, req, res, route.app, b, a.path, head);
      return;
    }
    // Every machine is at its hard limit: wait in the app's queue.
    const w: Waiter = {
      app: route.app,
      want: a.want,
      timer: undefined,
      start: (next) => {
        res.waiter = null;
        startExchange(this, req, res, route.app, next, a.path, head);
      },
      fail: (code, message) => {
        res.waiter = null;
        res.errorCode = code;
        sendProxyError(res, code, message, requestId);
      },
    };
    res.waiter = w;
    this.dispatch(route, w);
  }

  #onUpgrade(req: IncomingMessage, socket: Socket, head: Buffer, backhaul: boolean): void {
    this.#inflight++;
    const t = new Tunnel(this, req, socket, head, backhaul);
    this.#tunnels.add(t);
    t.begin();
  }

  /** Runs once per response, when it is done or its client left: accounting, client aborts, the request event. */
  #responseClosed(res: ProxyRes): void {
    const ex = res.exchange;
    if (res.waiter !== null) {
      this.dequeue(res.waiter);
      res.waiter = null;
      res.errorCode = 'client_closed';
    }
    if (ex !== null) {
      if (!ex.done) {
        ex.clientGone = true;
        res.errorCode = 'client_closed';
        ex.abort?.(clientClosed);
      }
      this.release(ex.backend);
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
        responseBytes: ex?.bytes ?? 0,
      };
      requestEvents.publish(event);
    }
    this.settled();
  }

  /** The app a Host names, undefined when it names none, false when it is not a valid Host value. */
  #appOf(host: string): string | undefined | false {
    const cached = this.#hostCache.get(host);
    if (cached !== undefined) return cached;
    if (!validHost.test(host)) return false;
    let end = host.length;
    if (host.charCodeAt(0) === 91 /* [ */) return undefined; // an IPv6 literal names no app
    const colon = host.indexOf(':');
    if (colon !== -1) end = colon;
    if (end > 0 && host.charCodeAt(end - 1) === 46 /* . */) end--;
    const name = host.slice(0, end).toLowerCase();
    const suffix = this.#suffix;
    // `<app>.<appsDomain>`, or a host name the app has a custom certificate for.
    const app = name.length > suffix.length && name.endsWith(suffix) ? name.slice(0, name.length - suffix.length) : this.#certs.appOf(name);
    if (app === undefined) return undefined;
    if (this.#hostCache.size >= hostCacheLimit) this.#hostCache.clear();
    this.#hostCache.set(host, app);
    return app;
  }

  #onBatch(batch: ChangeBatch): void {
    if (batch.revision > this.#index.revision && this.#certs.apply(batch.changes)) this.#hostCache.clear();
    if (!this.#index.apply(batch.revision, batch.changes) || this.#swapScheduled) return;
    // Coalesce the batches of one catalog callback (a watch response) into one rebuild, right after it: a microtask,
    // since under a burst of responses the next turn of the event loop comes only after all of them.
    this.#swapScheduled = true;
    queueMicrotask(this.#swap);
  }

  readonly #swap = (): void => {
    this.#swapScheduled = false;
    if (this.closing || !this.#index.rebuild()) return;
    this.#table = this.#index.table;
    this.#closeStalePools();
    this.h2Sessions.retain(this.#table);
    this.#autostart?.routed(this.#table);
    this.#ports.update(this.#table);
    // New or changed machines may take requests that wait.
    for (const app of [...this.#queues.keys()]) this.#drainQueue(app);
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
    if (pending && pending.req.complete && !pending.writableFinished && socket.writable && code !== 'ECONNRESET') {
      // A pipelined request broke while an earlier one's response is still on its way: let that response finish,
      // then close. A 400 written now would read as the earlier request's answer.
      pending.shouldKeepAlive = false;
      return;
    }
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
    this.#autostart?.close();
    for (const [app, q] of [...this.#queues]) {
      this.#queues.delete(app);
      publishQueue(app, 0);
      for (const w of q) {
        clearTimeout(w.timer);
        w.fail('shutting_down', 'the proxy is shutting down; retry');
      }
    }
    // The backhaul's HTTP server never listens itself (its listener hands it connections), like the TLS listener's.
    const servers = this.#backhaul === undefined ? [this.#server] : [this.#server, this.#backhaul];
    const serversClosed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
    for (const server of servers) server.closeIdleConnections();
    const tlsClosed = this.#tls?.stopAccepting();
    const portsClosed = this.#ports.close(this.#t.drainMs);
    const backhaulClosed = this.#backhaulListener?.stopAccepting();
    if (this.#inflight > 0) {
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve) => {
        this.#drained = resolve;
        timer = setTimeout(resolve, this.#t.drainMs);
      });
      clearTimeout(timer);
      if (this.#inflight > 0) this.#log.warn({ inflight: this.#inflight }, 'proxy drain timed out; cutting remaining requests');
    }
    for (const t of this.#tunnels) t.destroy();
    for (const server of servers) server.closeAllConnections();
    this.#tls?.destroy();
    this.#backhaulListener?.destroy();
    this.h2Sessions.destroyAll();
    // Timeouts held while requests drained; what is left is cut now.
    clearInterval(this.#sweepTimer);
    const pools = [...this.#pools.values()];
    this.#pools.clear();
    await Promise.all(pools.map((p) => p.destroy().catch(() => undefined)));
    await Promise.all([serversClosed, tlsClosed, backhaulClosed, portsClosed]);
    this.#log.info({}, 'proxy closed');
  }
}

/**
 * Fly's balancing: a backend below its soft limit before one above it, then the fewest in flight, then one in region
 * `near`, ties at random; none at or over its hard limit (undefined when every one is). `exclude` skips a machine that
 * just failed (and every machine behind the same connection: its host's backhaul).
 */
export function choose<B extends Backend>(backends: readonly B[], near?: string, exclude?: Backend): B | undefined {
  let best: B | undefined;
  let bestScore = Infinity;
  let ties = 0;
  for (let i = 0; i < backends.length; i++) {
    const b = backends[i]!;
    const n = b.inflight;
    if (n >= b.hardLimit) continue;
    if (exclude !== undefined && (b.machineId === exclude.machineId || b.origin === exclude.origin)) continue;
    const score = (n >= b.softLimit ? n + 0x4000_0000 : n) * 2 + (near === undefined || b.region === near ? 0 : 1);
    if (score < bestScore) {
      best = b;
      bestScore = score;
      ties = 1;
    } else if (score === bestScore && Math.random() * ++ties < 1) {
      best = b;
    }
  }
  return best;
}

/** What a request asks of the machine that serves it (Fly-Force-Instance-Id, Fly-Prefer-Region, backhaul). */
export interface Want {
  /** Only this machine. */
  readonly only: string | undefined;
  /** A machine of this region when one is below its hard limit, else any. */
  readonly region: string | undefined;
  /** Only a machine of this host (a backhaul request: never forwarded again). */
  readonly local: boolean;
}

/** A request routed to an app, waiting for (or handed) a backend slot. */
interface Waiter {
  readonly app: string;
  readonly want: Want | undefined;
  timer: NodeJS.Timeout | undefined;
  /** Called with a backend already counted in its `inflight`. */
  start(b: Backend): void;
  fail(code: ProxyErrorCode, message: string): void;
}

type Admission =
  | { ok: true; route: AppRoute; path: string; want: Want | undefined }
  | { ok: false; code: ProxyErrorCode; message: string; app?: string };

/** Host values that can name an app: a reg-name or IP literal and an optional port (RFC 3986 §3.2.2). */
const validHost = /^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=]*)(?::[0-9]*)?$/;
/** An absolute-form request target: its authority and the rest. */
const absoluteForm = /^https?:\/\/([^/?#]*)(.*)$/i;

/** Bytes read so far from a client request's connection: how the sweep sees a request body still flowing. */
function bytesReadOf(req: ProxyReq): number {
  return (req.socket as Socket | null | undefined)?.bytesRead ?? 0;
}

function onResponseDrain(this: ProxyRes): void {
  this.exchange?.resume?.();
}

/** Forwards a request to `b` (already counted in its `inflight`). */
function startExchange(proxy: HttpProxy, req: ProxyReq, res: ProxyRes, app: string, b: Backend, path: string, head: RequestHead): void {
  const ex = newExchange(proxy, req, res, app, b, path, head.headers, head.hasBody);
  res.exchange = ex;
  ex.send();
}

/** The exchange that forwards a request to `b`: h2c for a machine that speaks it, HTTP/1.1 otherwise. */
function newExchange(
  proxy: HttpProxy, req: ProxyReq, res: ProxyRes, app: string, b: Backend, path: string, headers: string[], hasBody: boolean,
): Exchange | H2Exchange {
  return b.h2 ? new H2Exchange(proxy, req, res, app, b, path, headers, hasBody) : new Exchange(proxy, req, res, app, b, path, headers, hasBody);
}

/** Listens on `at`; a failure names what could not listen and where. */
async function listenOn(server: import("node:net").Server, at: { host: string; port: number }, what: string): Promise<{ host: string; port: number }> {
  await new Promise<void>((resolve, reject) => {
    const onError = (err: Error) => reject(new TarmacError('unavailable', `${what} cannot listen on ${at.host}:${at.port}: ${err.message}; free the port or configure another`, { cause: err }));
    server.once('error', onError);
    server.listen(at.port, at.host, () => {
      server.off('error', onError);
      resolve();
    });
  });
  const a = server.address() as AddressInfo;
  return { host: a.address, port: a.port };
}

/** Starts the proxy's HTTP listener with a routing table loaded from `catalog` and kept current from its changes. */
export async function startProxy(opts: ProxyOptions): Promise<RunningProxy> {
  const proxy = new HttpProxy(opts);
  await proxy.listen();
  return proxy;
}
