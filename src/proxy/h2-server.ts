// The proxy's HTTP/2 server side: a node:http2 server fed connections by a listener (TLS with ALPN h2, or the
// backhaul's h2c), its sessions tracked so shutdown can ask them to go and then cut them.
import { createServer as createHttp2Server, type Http2Server, type Http2ServerRequest, type Http2ServerResponse, type ServerHttp2Session } from 'node:http2';
import type { Socket } from 'node:net';

export interface H2ServerOptions {
  /** Handles one request (node:http2's compatibility API). */
  onRequest(req: Http2ServerRequest, res: Http2ServerResponse): void;
  /** The response class requests get (it carries the proxy's per-request state). */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- node:http2 constructs it with its own arguments
  responseClass: new (...args: any[]) => Http2ServerResponse;
  /** Idle time before a session is asked to close (GOAWAY). */
  idleMs: number;
  /** Most request header fields (the request is answered 431 above it, as over HTTP/1.1). */
  maxHeaders: number;
  maxConcurrentStreams: number;
}

/** A node:http2 server that never listens itself: `accept` hands it a connection. */
export class H2Server {
  readonly #server: Http2Server;
  readonly #sessions = new Set<ServerHttp2Session>();

  constructor(opts: H2ServerOptions) {
    this.#server = createHttp2Server({
      Http2ServerResponse: opts.responseClass as typeof Http2ServerResponse,
      // Room for the pseudo-headers and one over the limit, so the proxy sees the excess and answers 431.
      maxHeaderListPairs: opts.maxHeaders + 8,
      settings: { maxConcurrentStreams: opts.maxConcurrentStreams, maxHeaderListSize: 64 * 1024, enablePush: false },
    }, opts.onRequest);
    this.#server.setTimeout(opts.idleMs);
    this.#server.on('timeout', (session: ServerHttp2Session) => session.close());
    this.#server.on('session', (session: ServerHttp2Session) => {
      this.#sessions.add(session);
      session.once('close', () => this.#sessions.delete(session));
    });
  }

  /** Serves HTTP/2 on a connection (whatever it already buffered is read first). */
  accept(socket: Socket): void {
    this.#server.emit('connection', socket);
  }

  /** Asks every session to go once its open streams are done (GOAWAY). */
  closeSessions(): void {
    for (const s of this.#sessions) s.close();
  }

  /** Cuts every session still open. */
  destroySessions(): void {
    for (const s of this.#sessions) s.destroy();
  }
}
