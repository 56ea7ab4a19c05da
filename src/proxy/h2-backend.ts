// h2c to machines (services with http_options.h2_backend, e.g. gRPC): one node:http2 session per backend, requests streamed both ways with trailers.
import { connect, constants as h2, type ClientHttp2Session, type ClientHttp2Stream, type IncomingHttpHeaders, type OutgoingHttpHeaders } from 'node:http2';
import type { IncomingMessage } from 'node:http';
import { Http2ServerResponse, type Http2ServerRequest } from 'node:http2';
import type { Writable } from 'node:stream';
import { errorMessage } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';
import { sendProxyError, writeHeadRaw } from './errors.ts';
import type { ProxyRes, Want } from './proxy.ts';
import type { Backend, RoutingTable } from './routing.ts';

/** Idle time before a backend session is closed (like the HTTP/1.1 pools' keep-alive). */
const sessionIdleMs = 4_000;

/** Request headers HTTP/2 forbids (connection-specific) or carries as pseudo-headers. */
const notForH2: ReadonlySet<string> = new Set(['host', 'connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'te', 'http2-settings']);

/** node:http2 client sessions to backends, one per origin, reused by every request to it and closed when idle or stale. */
export class H2Sessions {
  readonly #sessions = new Map<string, ClientHttp2Session>();
  /** Sessions whose connection was established (a stream failing on one that never was means the machine is unreachable). */
  readonly #up = new WeakSet<ClientHttp2Session>();
  readonly #connectMs: number;
  readonly #log: Logger;

  constructor(connectMs: number, log: Logger) {
    this.#connectMs = connectMs;
    this.#log = log;
  }

  /** The live session to `b`'s origin, connecting one if there is none. */
  get(b: Backend): ClientHttp2Session {
    const have = this.#sessions.get(b.origin);
    if (have !== undefined && !have.closed && !have.destroyed) return have;
    const session = connect(b.origin, { settings: { enablePush: false } });
    // Requests made while it connects each wait for 'connect' once: not a leak.
    session.setMaxListeners(0);
    this.#sessions.set(b.origin, session);
    const forget = () => {
      if (this.#sessions.get(b.origin) === session) this.#sessions.delete(b.origin);
    };
    const timer = setTimeout(() => session.destroy(new Error(`connecting to ${b.origin} timed out`)), this.#connectMs);
    session.once('connect', () => {
      clearTimeout(timer);
      this.#up.add(session);
    });
    session.on('error', (err) => this.#log.debug({ origin: b.origin, err: errorMessage(err) }, 'h2c backend session failed'));
    session.once('close', () => {
      clearTimeout(timer);
      forget();
    });
    session.once('goaway', forget); // new requests open a new session; streams in flight finish on this one
    session.setTimeout(sessionIdleMs, () => session.close());
    return session;
  }

  /** True once the session's connection was established. */
  reached(session: ClientHttp2Session): boolean {
    return this.#up.has(session);
  }

  /** Closes sessions to origins no longer in the routing table (streams in flight finish first). */
  retain(table: RoutingTable): void {
    if (this.#sessions.size === 0) return;
    const live = new Set<string>();
    for (const route of table.apps.values()) for (const b of route.backends) if (b.h2) live.add(b.origin);
    for (const [origin, s] of this.#sessions) {
      if (live.has(origin)) continue;
      this.#sessions.delete(origin);
      s.close();
    }
  }

  /** Cuts every session (shutdown, after the drain). */
  destroyAll(): void {
    for (const s of this.#sessions.values()) s.destroy();
    this.#sessions.clear();
  }
}

/** What an h2c exchange needs from the proxy. */
export interface H2ExchangeHost {
  readonly h2Sessions: H2Sessions;
  readonly timeouts: { backendHeadersMs: number; backendBodyMs: number };
  pickOther(app: string, failed: Backend, want: Want | undefined): Backend | undefined;
  release(b: Backend): void;
}

/**
 * One client request forwarded to a machine over h2c: headers converted to HTTP/2, the body piped (once the session
 * is up, so a failed connect can still retry elsewhere), the response and its trailers relayed with backpressure.
 * Shares the fields the proxy's response accounting reads with the HTTP/1.1 exchange.
 */
export class H2Exchange {
  attempts = 0;
  bytes = 0;
  done = false;
  clientGone = false;
  abort: ((err?: Error) => void) | null = null;
  resume: (() => void) | null = null;
  #stream: ClientHttp2Stream | undefined;
  #timer: NodeJS.Timeout | undefined;
  #trailers: IncomingHttpHeaders | undefined;

  constructor(
    readonly proxy: H2ExchangeHost,
    readonly req: IncomingMessage | Http2ServerRequest,
    readonly res: ProxyRes,
    readonly app: string,
    /** Acquired by the caller; released when the response closes. */
    public backend: Backend,
    readonly path: string,
    /** Flat [name, value, …] request headers as the HTTP/1.1 path forwards them. */
    readonly headers: readonly string[],
    readonly hasBody: boolean,
  ) {}

  send(): void {
    this.attempts++;
    const b = this.backend;
    const session = this.proxy.h2Sessions.get(b);
    const connected = !session.connecting;
    let stream: ClientHttp2Stream;
    try {
      stream = session.request(this.#requestHeaders(), { endStream: !this.hasBody });
    } catch (err) {
      // Headers HTTP/2 cannot carry (node:http2 refuses them before sending anything), e.g. two User-Agent fields.
      this.done = true;
      this.res.errorCode = 'bad_request';
      sendProxyError(this.res, 'bad_request', `bad request: it cannot be forwarded over HTTP/2 (${errorMessage(err)})`, this.res.requestId);
      return;
    }
    this.#stream = stream;
    this.abort = () => stream.close(h2.NGHTTP2_CANCEL);
    this.#timer = setTimeout(() => this.#fail(stream, 'backend_timeout'), this.proxy.timeouts.backendHeadersMs);
    stream.setTimeout(this.proxy.timeouts.backendBodyMs, () => stream.close(h2.NGHTTP2_CANCEL));
    if (this.hasBody) {
      const pipeBody = () => {
        if (this.#stream === stream && !stream.destroyed) this.req.pipe(stream);
      };
      if (connected) pipeBody();
      else session.once('connect', pipeBody);
    }
    stream.on('response', (headers, flags: number) => this.#onResponse(stream, headers, (flags & h2.NGHTTP2_FLAG_END_STREAM) !== 0));
    stream.on('data', (chunk: Buffer) => this.#onData(stream, chunk));
    stream.on('trailers', (trailers) => {
      this.#trailers = trailers;
    });
    stream.on('end', () => this.#onEnd(stream));
    stream.on('error', () => undefined); // reported through 'close' below
    stream.on('close', () => {
      if (this.#stream !== stream || this.done) return;
      clearTimeout(this.#timer);
      if (this.clientGone) {
        this.done = true;
        return;
      }
      this.#fail(stream, this.res.headersSent || this.proxy.h2Sessions.reached(session) ? 'backend_error' : 'backend_unreachable');
    });
  }

  #requestHeaders(): OutgoingHttpHeaders {
    const out: OutgoingHttpHeaders = {
      [h2.HTTP2_HEADER_METHOD]: this.req.method ?? 'GET',
      [h2.HTTP2_HEADER_PATH]: this.path,
      [h2.HTTP2_HEADER_SCHEME]: 'http',
    };
    const raw = this.headers;
    for (let i = 0; i < raw.length; i += 2) {
      const name = raw[i]!.toLowerCase();
      const value = raw[i + 1]!;
      if (name === 'host') {
        out[h2.HTTP2_HEADER_AUTHORITY] = value;
        continue;
      }
      if (notForH2.has(name)) continue;
      const have = out[name];
      if (have === undefined) out[name] = value;
      else out[name] = Array.isArray(have) ? [...have, value] : [String(have), value];
    }
    // gRPC servers look for it; HTTP/1.1 strips it as hop-by-hop, HTTP/2 allows exactly this value.
    if (/\btrailers\b/i.test(String(this.req.headers.te ?? ''))) out['te'] = 'trailers';
    // Through another host's backhaul: that host's proxy delivers to the machine named here.
    if (this.backend.via !== undefined) out['fly-force-instance-id'] = this.backend.machineId;
    return out;
  }

  #onResponse(stream: ClientHttp2Stream, headers: IncomingHttpHeaders, ended: boolean): void {
    if (this.#stream !== stream || this.done) return;
    clearTimeout(this.#timer);
    const res = this.res;
    if (ended && res instanceof Http2ServerResponse) {
      // A headers-only answer (gRPC's "trailers-only" error) must reach an HTTP/2 client as one HEADERS frame that
      // ends the stream; the compatibility API would send the headers and an empty end apart.
      this.done = true;
      const out: OutgoingHttpHeaders = { ...headers, 'fly-request-id': res.requestId, via: '2 tarmac' };
      try {
        res.stream.respond(out, { endStream: true });
      } catch {
        res.destroy();
      }
      return;
    }
    const out: string[] = [];
    for (const name of Object.keys(headers)) {
      if (name.charCodeAt(0) === 58 /* : */ || name === 'fly-request-id') continue;
      const v = headers[name];
      if (Array.isArray(v)) for (const one of v) out.push(name, one);
      else if (v !== undefined) out.push(name, String(v));
    }
    out.push('fly-request-id', res.requestId, 'via', '2 tarmac');
    try {
      writeHeadRaw(res, Number(headers[h2.HTTP2_HEADER_STATUS] ?? 502), out);
    } catch {
      stream.close(h2.NGHTTP2_CANCEL);
    }
  }

  #onData(stream: ClientHttp2Stream, chunk: Buffer): void {
    if (this.#stream !== stream || this.done) return;
    this.bytes += chunk.length;
    const res: Writable = this.res;
    if (res.write(chunk)) return;
    stream.pause();
    this.resume = () => {
      this.resume = null;
      stream.resume();
    };
    this.res.once('drain', () => this.resume?.());
  }

  #onEnd(stream: ClientHttp2Stream): void {
    if (this.#stream !== stream || this.done) return;
    this.done = true;
    clearTimeout(this.#timer);
    const t = this.#trailers;
    if (t !== undefined) {
      const trailers: OutgoingHttpHeaders = {};
      for (const name of Object.keys(t)) if (name.charCodeAt(0) !== 58) trailers[name] = t[name];
      try {
        this.res.addTrailers(trailers as Record<string, string>);
      } catch {
        this.res.destroy(); // trailers the client's protocol cannot carry: the response cannot end well
        return;
      }
    }
    this.res.end();
  }

  #fail(stream: ClientHttp2Stream, code: 'backend_unreachable' | 'backend_error' | 'backend_timeout'): void {
    if (this.#stream !== stream || this.done) return;
    clearTimeout(this.#timer);
    if (code === 'backend_unreachable' && this.attempts < 2 && !this.clientGone) {
      const next = this.proxy.pickOther(this.app, this.backend, this.res.want);
      if (next !== undefined && next.h2) {
        this.proxy.release(this.backend);
        this.backend = next;
        this.send();
        return;
      }
      if (next !== undefined) this.proxy.release(next);
    }
    this.done = true;
    stream.close(h2.NGHTTP2_CANCEL);
    const res = this.res;
    res.errorCode = code;
    const message = code === 'backend_unreachable' ? `could not reach a machine of app ${this.app}`
      : code === 'backend_timeout' ? `a machine of app ${this.app} did not answer in time`
        : `a machine of app ${this.app} closed the stream or sent an invalid response`;
    sendProxyError(res, code, message, res.requestId);
  }
}
