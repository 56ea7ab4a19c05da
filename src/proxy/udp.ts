// UDP relay for an app's own ports: each client address and port is a flow with its own socket to one machine, ended after an idle time.
import { createSocket, type RemoteInfo, type Socket as UdpSocket } from 'node:dgram';
import { isIPv6 } from 'node:net';
import { performance } from 'node:perf_hooks';
import type { PortBackend } from './ports.ts';
import type { RelayResult } from './tcp.ts';

export interface UdpRelayOptions {
  /** The backends of the port now (read for each new flow). */
  backends(): readonly PortBackend[];
  /** The balancer: a backend below its hard limit (not counted). */
  choose(backends: readonly PortBackend[]): PortBackend | undefined;
  /** A flow with no datagram either way for this long is ended. */
  idleMs: number;
  /** Called once per flow when it ends (or per dropped datagram that found no machine), with when it began (performance.now()). */
  done(result: RelayResult, startedAt: number): void;
}

/** Datagrams a flow holds while its socket connects; more are dropped (UDP may drop). */
const maxPending = 64;

interface Flow {
  readonly backend: PortBackend;
  readonly socket: UdpSocket;
  timer: NodeJS.Timeout;
  readonly startedAt: number;
  /** Datagrams that came before the socket was connected; null once it is. */
  pending: Buffer[] | null;
  bytesIn: number;
  bytesOut: number;
}

/**
 * Forwards the datagrams `listener` receives: a client's first datagram picks the least-loaded machine (counted as one
 * connection in its `inflight` while the flow lives) and opens a socket connected to it; the machine's replies go back
 * to the client from the listener's address. Only machines of this host (UDP is not carried over the backhaul).
 */
export class UdpRelay {
  readonly #listener: UdpSocket;
  readonly #o: UdpRelayOptions;
  readonly #flows = new Map<string, Flow>();

  constructor(listener: UdpSocket, opts: UdpRelayOptions) {
    this.#listener = listener;
    this.#o = opts;
    listener.on('message', (msg, rinfo) => this.#onMessage(msg, rinfo));
  }

  /** Ends every flow (the listener is closing). */
  close(): void {
    for (const key of [...this.#flows.keys()]) this.#end(key);
  }

  #onMessage(msg: Buffer, client: RemoteInfo): void {
    const key = `${client.address}|${client.port}`;
    let flow = this.#flows.get(key);
    if (flow === undefined) {
      const backends = this.#o.backends();
      const b = this.#o.choose(backends);
      if (b === undefined) {
        this.#o.done({ machineId: undefined, bytesIn: msg.length, bytesOut: 0, error: backends.length === 0 ? 'no_machine' : 'over_capacity' }, performance.now());
        return;
      }
      b.inflight++;
      const socket = createSocket(isIPv6(b.address) ? 'udp6' : 'udp4');
      const f: Flow = { backend: b, socket, timer: this.#idleTimer(key), startedAt: performance.now(), pending: [], bytesIn: 0, bytesOut: 0 };
      flow = f;
      this.#flows.set(key, f);
      socket.on('error', () => this.#end(key));
      socket.on('message', (reply) => {
        f.bytesOut += reply.length;
        f.timer.refresh();
        this.#listener.send(reply, client.port, client.address);
      });
      socket.connect(b.port, b.address, (err?: Error) => {
        // A connect that failed (the machine's route is gone) ends the flow; sending on it would throw.
        if (err) return this.#endFlow(key, f);
        for (const m of f.pending ?? []) socket.send(m, (e) => { if (e) this.#endFlow(key, f); });
        f.pending = null;
      });
    }
    flow.bytesIn += msg.length;
    flow.timer.refresh();
    if (flow.pending !== null) {
      if (flow.pending.length < maxPending) flow.pending.push(msg);
    }
    else {
      const f = flow;
      try {
        f.socket.send(msg, (e) => { if (e) this.#endFlow(key, f); });
      } catch {
        this.#endFlow(key, f); // the flow's socket is closed or not connected: the next datagram starts a new one
      }
    }
  }

  #idleTimer(key: string): NodeJS.Timeout {
    const timer = setTimeout(() => this.#end(key), this.#o.idleMs);
    timer.unref();
    return timer;
  }

  /** Ends `f` if it is still the flow of `key` (a late error of an ended flow leaves its successor alone). */
  #endFlow(key: string, f: Flow): void {
    if (this.#flows.get(key) === f) this.#end(key);
  }

  #end(key: string): void {
    const f = this.#flows.get(key);
    if (f === undefined) return;
    this.#flows.delete(key);
    clearTimeout(f.timer);
    f.backend.inflight--;
    f.socket.close();
    this.#o.done({ machineId: f.backend.machineId, bytesIn: f.bytesIn, bytesOut: f.bytesOut, error: undefined }, f.startedAt);
  }
}
