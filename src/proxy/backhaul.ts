// The backhaul listener: requests other hosts' proxies forward to this host's machines, over HTTP/1.1 or h2c (HTTP/2
// with prior knowledge, for machines that speak h2c such as gRPC servers), told apart by the connection's first bytes.
import type { Http2ServerRequest, Http2ServerResponse } from 'node:http2';
import { createServer as createNetServer, type Server as NetServer, type Socket } from 'node:net';
import { H2Server } from './h2-server.ts';

/** The start of every HTTP/2 prior-knowledge connection ("PRI * HTTP/2.0…"); no HTTP/1.1 request begins so. */
const h2Preface = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');

export interface BackhaulListenerOptions {
  /** The proxy's backhaul node:http server: HTTP/1.1 connections are handed to it. */
  http1: { emit(event: 'connection', socket: Socket): boolean };
  /** Handles one h2c request (node:http2's compatibility API). */
  onRequest(req: Http2ServerRequest, res: Http2ServerResponse): void;
  /** The response class h2c requests get (it carries the proxy's per-request state). */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- node:http2 constructs it with its own arguments
  responseClass: new (...args: any[]) => Http2ServerResponse;
  /** Time a connection has to send its first bytes; idle time before an h2c session is asked to close. */
  idleMs: number;
  maxHeaders: number;
}

/** Accepts backhaul connections and hands each to the HTTP/1.1 server or to an h2c server by its first bytes. */
export class BackhaulListener {
  readonly server: NetServer;
  readonly #o: BackhaulListenerOptions;
  readonly #h2: H2Server;
  /** Connections still being sniffed (not yet handed to either server). */
  readonly #sniffing = new Set<Socket>();

  constructor(opts: BackhaulListenerOptions) {
    this.#o = opts;
    // One session carries an edge's many requests to this host: more streams at once than a client gets.
    this.#h2 = new H2Server({ ...opts, maxConcurrentStreams: 1000 });
    this.server = createNetServer({ noDelay: true }, (socket) => this.#sniff(socket));
  }

  /** Stops accepting and asks h2c peers to go once their streams are done; resolves when the listener is closed. */
  stopAccepting(): Promise<void> {
    this.#h2.closeSessions();
    for (const s of this.#sniffing) s.destroy();
    if (!this.server.listening) return Promise.resolve();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  /** Cuts every h2c session still open (HTTP/1.1 sockets belong to the HTTP server). */
  destroy(): void {
    this.#h2.destroySessions();
  }

  #sniff(socket: Socket): void {
    this.#sniffing.add(socket);
    let seen: Buffer = Buffer.alloc(0);
    const timer = setTimeout(() => socket.destroy(), this.#o.idleMs);
    const onError = () => socket.destroy();
    const onClose = () => {
      clearTimeout(timer);
      this.#sniffing.delete(socket);
    };
    const onData = (chunk: Buffer) => {
      seen = seen.length === 0 ? chunk : Buffer.concat([seen, chunk]);
      const n = Math.min(seen.length, h2Preface.length);
      const h2 = seen.subarray(0, n).equals(h2Preface.subarray(0, n));
      if (h2 && n < h2Preface.length) return; // the preface so far: wait for the rest
      socket.off('data', onData);
      socket.off('error', onError);
      socket.off('close', onClose);
      onClose();
      socket.pause();
      socket.unshift(seen);
      if (h2) {
        this.#h2.accept(socket); // the session reads what is buffered on the socket first
      } else {
        this.#o.http1.emit('connection', socket);
        socket.resume(); // node:http reads through 'data' from here on, the unshifted bytes first
      }
    };
    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('close', onClose);
  }
}
