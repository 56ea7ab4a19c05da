// Listeners on apps' own addresses: one per address and non-shared service port, opened and closed as the routing table changes.
import { channel } from 'node:diagnostics_channel';
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import type { IncomingMessage } from 'node:http';
import { createServer, isIPv6, type Server, type Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import type { Duplex } from 'node:stream';
import { createServer as createTlsServer, type Server as TlsServer, type TLSSocket } from 'node:tls';
import { errorMessage } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';
import { tlsMinVersion, type CertificateIndex } from './certificates.ts';
import type { PortBackend } from './ports.ts';
import type { RoutingTable } from './routing.ts';
import { acceptBackhaulTunnel, relayTcp, type RelayResult } from './tcp.ts';
import { UdpRelay } from './udp.ts';

/** Name of the diagnostics channel carrying one ProxyConnectionEvent per TCP connection or UDP flow on an app's own address. */
export const proxyConnectionChannel = 'tarmac:proxy:connection';

/** Published on `tarmac:proxy:connection` when a connection (or UDP flow) ends, or is refused for want of a machine. */
export interface ProxyConnectionEvent extends RelayResult {
  readonly app: string;
  readonly protocol: 'tcp' | 'udp';
  /** The port the client connected to. */
  readonly port: number;
  readonly durationMs: number;
}

const connectionEvents = channel(proxyConnectionChannel);

export interface PortListenersOptions {
  log: Logger;
  /** Open listeners (an edge); false keeps only the table, for backhaul tunnels to this host's machines. */
  listen: boolean;
  /** The proxy's balancer (least loaded, below the hard limit, this region first, ties at random). */
  choose(backends: readonly PortBackend[], exclude?: PortBackend): PortBackend | undefined;
  certificates: CertificateIndex;
  /** True when an app of that name exists now (for its self-signed certificate). */
  appExists(app: string): boolean;
  /** Hands a connection of an `http` port to the proxy's HTTP path: as it is, or to its TLS listener (`tls` + `http`). */
  http(socket: Socket, tls: boolean): void;
  connectMs: number;
  handshakeMs: number;
  /** A UDP flow with no datagram either way for this long is ended. */
  udpIdleMs: number;
  /** How long to wait before trying again to listen where it failed (address not on this host, port in use). Default 2 s. */
  retryMs?: number;
}

/** One address and port being listened on, for one app. */
interface PortListener {
  readonly key: string;
  readonly app: string;
  readonly ip: string;
  readonly port: number;
  readonly protocol: 'tcp' | 'udp';
  /** The port's backends in the current table (the listener reads them for each new connection or flow). */
  backends: readonly PortBackend[];
  server: Server | UdpSocket | undefined;
  udp: UdpRelay | undefined;
  retry: NodeJS.Timeout | undefined;
  warned: boolean;
  closed: boolean;
}

/**
 * Keeps a listener on `<app address>:<port>` for every tcp and udp port of the started machines of apps that have
 * addresses, from the routing table (`update` on every swap): a listener opens when a port first has a backend and
 * closes when the last one goes or the address is released; connections already relayed keep going. A tcp port is
 * relayed raw, after TLS termination (`tls`), or handed to the HTTP path (`http`, with or without `tls`).
 */
export class PortListeners {
  readonly #o: PortListenersOptions;
  readonly #log: Logger;
  readonly #listeners = new Map<string, PortListener>();
  /** `ip|port` → app, for the tcp listeners whose connections go to the HTTP path (the Host header does not pick the app). */
  readonly #httpApps = new Map<string, string>();
  /** Client connections being relayed (cut when the drain time runs out at close). */
  readonly #relayed = new Set<Socket>();
  #tls: Promise<TlsServer> | undefined;
  #table: RoutingTable | undefined;
  #closing = false;
  #drained: (() => void) | undefined;

  constructor(opts: PortListenersOptions) {
    this.#o = opts;
    this.#log = opts.log;
  }

  /** The app whose address and port a connection came in on, when that port goes to the HTTP path. */
  httpAppOf(socket: { localAddress?: string | undefined; localPort?: number | undefined }): string | undefined {
    if (this.#httpApps.size === 0) return undefined;
    return this.#httpApps.get(`${unmapped(socket.localAddress ?? '')}|${socket.localPort ?? 0}`);
  }

  /** Opens and closes listeners to match the table's apps with addresses. */
  update(table: RoutingTable): void {
    if (this.#closing) return;
    this.#table = table;
    if (!this.#o.listen) return;
    const want = new Map<string, { app: string; ip: string; port: number; protocol: 'tcp' | 'udp'; backends: PortBackend[] }>();
    for (const [app, entry] of table.ports) {
      for (const b of entry.backends) {
        for (const ip of entry.ips) {
          const key = `${b.protocol}|${ip}|${b.publicPort}`;
          let w = want.get(key);
          if (w === undefined) want.set(key, (w = { app, ip, port: b.publicPort, protocol: b.protocol, backends: [] }));
          w.backends.push(b);
        }
      }
    }
    for (const [key, l] of this.#listeners) {
      const w = want.get(key);
      if (w === undefined || w.app !== l.app) this.#close(l);
    }
    this.#httpApps.clear();
    for (const [key, w] of want) {
      let l = this.#listeners.get(key);
      if (l === undefined) {
        l = { key, ...w, server: undefined, udp: undefined, retry: undefined, warned: false, closed: false };
        this.#listeners.set(key, l);
        this.#open(l);
      }
      l.backends = Object.freeze(w.backends);
      if (w.protocol === 'tcp' && w.backends[0]!.handlers.includes('http')) this.#httpApps.set(`${w.ip}|${w.port}`, w.app);
    }
  }

  /** For the backhaul: one of this host's machines' tcp ports on an app address, by machine id and internal port. */
  findLocal(machineId: string, internalPort: number): PortBackend | undefined {
    for (const entry of this.#table?.ports.values() ?? []) {
      for (const b of entry.backends) {
        if (b.machineId === machineId && b.internalPort === internalPort && b.protocol === 'tcp' && b.via === undefined) return b;
      }
    }
    return undefined;
  }

  /** Takes a backhaul CONNECT from another host's proxy: a tunnel to one of this host's machines' ports. */
  acceptTunnel(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    acceptBackhaulTunnel(req, socket, head, (id, port) => this.findLocal(id, port), this.#o.connectMs);
  }

  /** Stops listening, lets relayed connections finish for up to `drainMs`, then cuts the rest. */
  async close(drainMs: number): Promise<void> {
    this.#closing = true;
    for (const l of this.#listeners.values()) this.#close(l);
    this.#httpApps.clear();
    if (this.#relayed.size > 0) {
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve) => {
        this.#drained = resolve;
        timer = setTimeout(resolve, drainMs);
      });
      clearTimeout(timer);
    }
    for (const s of this.#relayed) s.destroy();
  }

  #open(l: PortListener): void {
    l.retry = undefined;
    if (l.closed) return;
    const onError = (err: Error) => {
      if (l.closed) return;
      if (!l.warned) this.#log.warn({ app: l.app, address: l.ip, port: l.port, protocol: l.protocol, err: errorMessage(err) }, 'cannot listen on an app address yet; retrying');
      l.warned = true;
      const s = l.server;
      l.server = undefined;
      l.udp?.close();
      l.udp = undefined;
      if (s !== undefined) closeQuietly(s);
      l.retry = setTimeout(() => this.#open(l), this.#o.retryMs ?? 2_000);
    };
    const onListening = () => {
      if (l.warned) this.#log.info({ app: l.app, address: l.ip, port: l.port, protocol: l.protocol }, 'listening on an app address');
      l.warned = false;
    };
    if (l.protocol === 'udp') {
      const socket = createSocket({ type: isIPv6(l.ip) ? 'udp6' : 'udp4' });
      l.server = socket;
      l.udp = new UdpRelay(socket, {
        backends: () => l.backends.filter((b) => b.via === undefined),
        choose: (bs) => this.#o.choose(bs),
        idleMs: this.#o.udpIdleMs,
        done: (r, started) => this.#publish(l, started, r),
      });
      socket.once('error', onError);
      socket.bind(l.port, l.ip, () => {
        socket.off('error', onError);
        socket.on('error', (err) => this.#log.warn({ app: l.app, port: l.port, err: errorMessage(err) }, 'udp listener error'));
        onListening();
      });
      return;
    }
    const server = createServer({ allowHalfOpen: true, pauseOnConnect: true, noDelay: true }, (socket) => this.#accept(l, socket));
    l.server = server;
    server.once('error', onError);
    server.listen(l.port, l.ip, () => {
      server.off('error', onError);
      server.on('error', (err) => this.#log.warn({ app: l.app, port: l.port, err: errorMessage(err) }, 'tcp listener error'));
      onListening();
    });
  }

  #close(l: PortListener): void {
    l.closed = true;
    clearTimeout(l.retry);
    l.udp?.close();
    if (l.server !== undefined) closeQuietly(l.server);
    l.server = undefined;
    this.#listeners.delete(l.key);
  }

  #accept(l: PortListener, socket: Socket): void {
    const handlers = l.backends[0]?.handlers ?? [];
    if (handlers.includes('http')) {
      socket.resume();
      this.#o.http(socket, handlers.includes('tls'));
      return;
    }
    this.#relayed.add(socket);
    socket.once('close', () => {
      this.#relayed.delete(socket);
      if (this.#relayed.size === 0) this.#drained?.();
    });
    if (!handlers.includes('tls')) {
      this.#relay(l, socket);
      return;
    }
    socket.on('error', () => socket.destroy());
    this.#tlsServer().then((tls) => {
      if (socket.destroyed) return;
      socket.resume();
      tls.emit('connection', socket);
    }, (err: unknown) => {
      this.#log.error({ err: errorMessage(err) }, 'no TLS certificate for an app address');
      socket.destroy();
    });
  }

  /** Relays a client connection (the raw socket, or its TLS socket) to the port's least-loaded backend. */
  #relay(l: PortListener, client: Socket): void {
    const started = performance.now();
    relayTcp(client, {
      backends: l.backends,
      choose: (bs, exclude) => this.#o.choose(bs, exclude),
      destination: { address: unmapped(client.localAddress ?? l.ip), port: client.localPort ?? l.port },
      connectMs: this.#o.connectMs,
      done: (r) => this.#publish(l, started, r),
    });
  }

  /** The TLS server that terminates `tls` ports (it never listens: raw connections are handed to it); made on first use. */
  #tlsServer(): Promise<TlsServer> {
    this.#tls ??= this.#o.certificates.defaultPem().then((fallback) => {
      const o = this.#o;
      const server = createTlsServer({
        cert: fallback.cert,
        key: fallback.key,
        minVersion: tlsMinVersion,
        handshakeTimeout: o.handshakeMs,
        SNICallback: (servername, cb) => {
          o.certificates.contextFor(servername, o.appExists).then((ctx) => cb(null, ctx), (err: Error) => cb(err));
        },
      });
      server.on('secureConnection', (tls: TLSSocket) => {
        const l = this.#listeners.get(`tcp|${unmapped(tls.localAddress ?? '')}|${tls.localPort ?? 0}`);
        if (l === undefined) return tls.destroy();
        this.#relay(l, tls);
      });
      server.on('tlsClientError', (_err: Error, tls: TLSSocket) => tls.destroy());
      return server;
    });
    const made = this.#tls;
    made.catch(() => {
      if (this.#tls === made) this.#tls = undefined; // the next connection tries again
    });
    return made;
  }

  #publish(l: PortListener, started: number, r: RelayResult): void {
    if (!connectionEvents.hasSubscribers) return;
    connectionEvents.publish({ ...r, app: l.app, protocol: l.protocol, port: l.port, durationMs: performance.now() - started } satisfies ProxyConnectionEvent);
  }
}

/** `::ffff:1.2.3.4` as `1.2.3.4`. */
function unmapped(address: string): string {
  return address.startsWith('::ffff:') && address.includes('.') ? address.slice(7) : address;
}

function closeQuietly(s: Server | UdpSocket): void {
  try {
    s.close();
  } catch {
    // not listening (yet): nothing to close
  }
}
