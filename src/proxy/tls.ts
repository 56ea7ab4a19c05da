// The proxy's TLS listener: SNI picks the certificate, ALPN hands h2 connections to node:http2 and the rest to the proxy's node:http server.
import { channel } from 'node:diagnostics_channel';
import type { Http2ServerRequest, Http2ServerResponse } from 'node:http2';
import type { Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import { createServer as createTlsServer, type Server as TlsServer, type TLSSocket } from 'node:tls';
import type { Logger } from '../shared/log.ts';
import { H2Server } from './h2-server.ts';
import { acmeTlsAlpn } from './acme-challenges.ts';
import { tlsMinVersion, type CertificateIndex, type PemPair } from './certificates.ts';

/** Name of the diagnostics channel carrying one ProxyTlsEvent per TLS handshake (done or failed). */
export const proxyTlsChannel = 'tarmac:proxy:tls';

/** Published on `tarmac:proxy:tls` when a handshake finishes or fails. */
export interface ProxyTlsEvent {
  /** From the TCP connection being accepted to the handshake's end; undefined when it could not be timed. */
  readonly durationMs: number | undefined;
  /** Why it failed (a small fixed set, for metric labels); undefined when it succeeded. */
  readonly failure: TlsFailure | undefined;
  /** Negotiated protocol version ('TLSv1.3', …) and ALPN protocol ('h2', 'http/1.1', or false), when it succeeded. */
  readonly version: string | undefined;
  readonly alpn: string | false | undefined;
}

export type TlsFailure = 'protocol_version' | 'not_tls' | 'timeout' | 'reset' | 'no_shared_cipher' | 'other';

const tlsEvents = channel(proxyTlsChannel);

const failureByCode: Readonly<Record<string, TlsFailure>> = {
  ERR_SSL_UNSUPPORTED_PROTOCOL: 'protocol_version',
  ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION: 'protocol_version',
  ERR_SSL_WRONG_VERSION_NUMBER: 'not_tls',
  ERR_SSL_HTTP_REQUEST: 'not_tls',
  ERR_TLS_HANDSHAKE_TIMEOUT: 'timeout',
  ECONNRESET: 'reset',
  ERR_SSL_NO_SHARED_CIPHER: 'no_shared_cipher',
};

/** When the TCP connection under a TLS socket was accepted. */
const acceptedAt = Symbol('tarmac.acceptedAt');
type Timed = Socket & { [acceptedAt]?: number };

function handshakeMs(tls: TLSSocket): number | undefined {
  // node:tls keeps the accepted TCP socket as `_parent` (not a public field: without it the handshake goes untimed).
  const start = (tls as TLSSocket & { _parent?: Timed })._parent?.[acceptedAt];
  return start === undefined ? undefined : performance.now() - start;
}

export interface TlsListenerOptions {
  certificates: CertificateIndex;
  /** True when an app of that name exists now (it gets a self-signed certificate for `<app>.<appsDomain>`). */
  appExists(app: string): boolean;
  /** The proxy's node:http server: HTTP/1.1 connections are handed to it, so they take the same path as plain ones. */
  http1: { emit(event: 'connection', socket: Socket): boolean };
  /** Handles one HTTP/2 request (node:http2's compatibility API). */
  onRequest(req: Http2ServerRequest, res: Http2ServerResponse): void;
  /** The response class HTTP/2 requests get (it carries the proxy's per-request state). */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- node:http2 constructs it with its own arguments
  responseClass: new (...args: any[]) => Http2ServerResponse;
  /** Time a client has for its handshake. */
  handshakeMs: number;
  /** Idle time before an HTTP/2 connection is asked to close (GOAWAY). */
  idleMs: number;
  /** Most request header fields (the request is answered 431 above it, as over HTTP/1.1). */
  maxHeaders: number;
  log: Logger;
}

/**
 * Terminates TLS 1.2/1.3 on one port. The certificate comes from `certificates` by SNI (changes apply to the next
 * handshake); ALPN `h2` connections become node:http2 sessions whose requests go to `onRequest`, every other one is
 * handed to the proxy's HTTP/1.1 server as if it had accepted it.
 */
export class TlsListener {
  readonly #o: TlsListenerOptions;
  #tls: TlsServer | undefined;
  readonly #h2: H2Server;
  /**
   * The SNI name of the handshake whose ALPN callback just picked `acme-tls/1`: OpenSSL selects ALPN before the
   * certificate, so its SNICallback (run next, in the same I/O callback) serves the TLS-ALPN-01 challenge certificate.
   */
  #acmeName: string | undefined;

  constructor(opts: TlsListenerOptions) {
    this.#o = opts;
    this.#h2 = new H2Server({ ...opts, maxConcurrentStreams: 250 });
  }

  /**
   * Makes the TLS server (to be listened on by the caller) with `fallback` as the certificate for clients that send
   * no SNI or a name nothing covers.
   */
  start(fallback: PemPair): TlsServer {
    const opts = this.#o;
    const server = createTlsServer({
      cert: fallback.cert,
      key: fallback.key,
      minVersion: tlsMinVersion,
      // h2, else http/1.1 (a client offering neither is refused, as with a fixed list); acme-tls/1 only for a pending challenge.
      ALPNCallback: ({ servername, protocols }) => {
        if (protocols.includes('h2')) return 'h2';
        if (protocols.includes('http/1.1')) return 'http/1.1';
        if (!servername || !protocols.includes(acmeTlsAlpn) || !opts.certificates.challenges.hasAlpn(servername)) return undefined;
        this.#acmeName = servername;
        setImmediate(() => { this.#acmeName = undefined; });
        return acmeTlsAlpn;
      },
      handshakeTimeout: opts.handshakeMs,
      SNICallback: (servername, cb) => {
        const challenge = this.#acmeName === servername ? opts.certificates.challenges.alpnContext(servername) : undefined;
        this.#acmeName = undefined;
        // No context: the server's own (the fallback) certificate.
        (challenge ?? opts.certificates.contextFor(servername, opts.appExists)).then((ctx) => cb(null, ctx), (err: Error) => cb(err));
      },
    });
    server.on('connection', (socket: Timed) => {
      socket[acceptedAt] = performance.now();
    });
    server.on('secureConnection', (socket: TLSSocket) => this.#onSecure(socket));
    server.on('tlsClientError', (err: Error & { code?: string }, socket: TLSSocket) => {
      if (tlsEvents.hasSubscribers) {
        tlsEvents.publish({
          durationMs: handshakeMs(socket), failure: failureByCode[err.code ?? ''] ?? 'other', version: undefined, alpn: undefined,
        } satisfies ProxyTlsEvent);
      }
      socket.destroy();
    });
    this.#tls = server;
    return server;
  }

  /**
   * Stops accepting connections and asks HTTP/2 clients to go once their open streams are done (GOAWAY). Resolves
   * when every connection it accepted is closed.
   */
  stopAccepting(): Promise<void> {
    this.#h2.closeSessions();
    const server = this.#tls;
    if (server === undefined || !server.listening) return Promise.resolve();
    return new Promise((resolve) => server.close(() => resolve()));
  }

  /** Cuts every HTTP/2 session still open (the drain timeout ran out); HTTP/1.1 sockets belong to the HTTP server. */
  destroy(): void {
    this.#h2.destroySessions();
  }

  #onSecure(socket: TLSSocket): void {
    if (tlsEvents.hasSubscribers) {
      tlsEvents.publish({
        durationMs: handshakeMs(socket), failure: undefined, version: socket.getProtocol() ?? undefined, alpn: socket.alpnProtocol ?? false,
      } satisfies ProxyTlsEvent);
    }
    if (socket.alpnProtocol === 'h2') this.#h2.accept(socket);
    else if (socket.alpnProtocol === acmeTlsAlpn) socket.end(); // TLS-ALPN-01 validation is the handshake itself
    else this.#o.http1.emit('connection', socket);
  }
}
