// TCP relay for an app's own ports: a client connection spliced to a machine (directly, or through its host's backhaul with CONNECT), with an optional PROXY header.
import type { IncomingMessage } from 'node:http';
import { connect, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { PortBackend } from './ports.ts';
import { proxyHeader, type Endpoint } from './proxy-protocol.ts';

/** Why a connection got no machine or lost it; undefined when it was relayed until a side closed. */
export type RelayError = 'no_machine' | 'over_capacity' | 'backend_unreachable';

/** What one relayed connection (or UDP flow) did, for metrics. */
export interface RelayResult {
  readonly machineId: string | undefined;
  /** Bytes from the client to the machine, and back. */
  readonly bytesIn: number;
  readonly bytesOut: number;
  readonly error: RelayError | undefined;
}

export interface TcpRelayOptions {
  /** The backends of the port the client connected to. */
  readonly backends: readonly PortBackend[];
  /** The balancer: a backend below its hard limit (not counted), never `exclude` or one behind the same address. */
  choose(backends: readonly PortBackend[], exclude?: PortBackend): PortBackend | undefined;
  /** The address and port the client connected to (the PROXY header's destination). */
  readonly destination: Endpoint;
  readonly connectMs: number;
  done(result: RelayResult): void;
}

/**
 * Relays `client` (a plain socket, or a TLS socket whose handshake is done) to the least-loaded backend: connects
 * (through the machine's host's backhaul when `via` is set), writes the PROXY header the port asks for, then splices
 * both ways with half-close kept. A failed connect tries one other backend. The backend counts the connection in
 * `inflight` until both sides are closed.
 */
export function relayTcp(client: Socket, opts: TcpRelayOptions): void {
  client.pause();
  const source: Endpoint = { address: client.remoteAddress ?? '', port: client.remotePort ?? 0 };
  /** The machine tried last (the one relayed to, once `ready`). */
  let backend: PortBackend | undefined;
  /** The connection being made or spliced; counted in its backend's `inflight` until it closes. */
  let upstream: Socket | undefined;
  let ready = false;
  let clientOpen = true;
  let attempts = 0;
  let bytesIn = 0;
  let bytesOut = 0;
  let error: RelayError | undefined;
  let finished = false;

  const maybeFinish = () => {
    if (finished || clientOpen || upstream !== undefined) return;
    finished = true;
    opts.done({ machineId: ready ? backend?.machineId : undefined, bytesIn, bytesOut, error });
  };
  client.on('error', () => client.destroy());
  client.on('close', () => {
    clientOpen = false;
    if (upstream !== undefined) {
      if (ready) closeSoon(upstream);
      else upstream.destroy();
    }
    maybeFinish();
  });

  const attempt = (b: PortBackend) => {
    attempts++;
    backend = b;
    b.inflight++;
    const up = connect({ host: b.address, port: b.port, allowHalfOpen: true, noDelay: true });
    upstream = up;
    const timer = setTimeout(() => up.destroy(), opts.connectMs);
    up.on('error', () => up.destroy());
    up.on('close', () => {
      clearTimeout(timer);
      b.inflight--;
      upstream = undefined;
      if (ready) {
        if (clientOpen) closeSoon(client);
        return maybeFinish();
      }
      if (!clientOpen) return maybeFinish();
      // Never reached the machine: try one other.
      const next = attempts < 2 ? opts.choose(opts.backends, b) : undefined;
      if (next !== undefined) return attempt(next);
      error = 'backend_unreachable';
      client.destroy();
    });
    const splice = () => {
      clearTimeout(timer);
      ready = true;
      if (b.proxyProto !== undefined) up.write(proxyHeader(b.proxyProto, source, opts.destination));
      client.on('data', (chunk: Buffer) => { bytesIn += chunk.length; });
      up.on('data', (chunk: Buffer) => { bytesOut += chunk.length; });
      client.pipe(up);
      up.pipe(client);
      client.resume();
    };
    up.once('connect', () => {
      if (b.via === undefined) return splice();
      // Through the machine's host: ask its backhaul listener for a tunnel to the machine's port.
      up.write(`CONNECT ${b.machineId}:${b.internalPort} HTTP/1.1\r\nhost: ${b.machineId}:${b.internalPort}\r\nfly-force-instance-id: ${b.machineId}\r\n\r\n`);
      void readTunnelAnswer(up).then((ok) => (ok ? splice() : up.destroy()));
    });
  };

  const first = opts.choose(opts.backends);
  if (first !== undefined) return attempt(first);
  error = opts.backends.length === 0 ? 'no_machine' : 'over_capacity';
  client.destroy();
}

/** Ends a socket (flushing what is queued), and destroys it if the peer has not closed it a little later. */
export function closeSoon(s: Duplex): void {
  if (s.destroyed) return;
  if (!s.writableEnded) s.end();
  const timer = setTimeout(() => s.destroy(), 2_000);
  s.once('close', () => clearTimeout(timer));
}

/** Reads a CONNECT answer's head; true for a 2xx. Bytes after the head (a machine that speaks first) are put back. */
function readTunnelAnswer(up: Socket): Promise<boolean> {
  return new Promise((resolve) => {
    let head = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      head = Buffer.concat([head, chunk]);
      const end = head.indexOf('\r\n\r\n');
      if (end === -1) {
        if (head.length > 8192) done(false);
        return;
      }
      up.pause();
      const rest = head.subarray(end + 4);
      if (rest.length > 0) up.unshift(rest);
      done(/^HTTP\/1\.[01] 2\d\d /.test(head.subarray(0, end).toString('latin1')));
    };
    const onClose = () => done(false);
    const done = (ok: boolean) => {
      up.off('data', onData);
      up.off('close', onClose);
      resolve(ok);
    };
    up.on('data', onData);
    up.on('close', onClose);
  });
}

/**
 * The worker's end of a backhaul tunnel: a `CONNECT <machine id>:<internal port>` from another host's proxy, answered
 * with a splice to that machine's port when `find` knows it as one of this host's started machines with room.
 */
export function acceptBackhaulTunnel(req: IncomingMessage, client: Duplex, head: Buffer, find: (machineId: string, port: number) => PortBackend | undefined, connectMs: number): void {
  client.on('error', () => client.destroy());
  // The edge's half-close (its client's end) must reach the machine without ending the way back.
  client.allowHalfOpen = true;
  const refuse = (status: string, code: string, message: string) => {
    client.end(`HTTP/1.1 ${status}\r\ntarmac-proxy-error: ${code}\r\ncontent-type: text/plain\r\ncontent-length: ${Buffer.byteLength(message)}\r\nconnection: close\r\n\r\n${message}`);
  };
  const m = /^([A-Za-z0-9]+):(\d{1,5})$/.exec(req.url ?? '');
  const b = m === null ? undefined : find(m[1]!, Number(m[2]));
  if (b === undefined) return refuse('503 Service Unavailable', 'no_machine', `machine port ${req.url ?? ''} is not started here`);
  if (b.inflight >= b.hardLimit) return refuse('503 Service Unavailable', 'over_capacity', `machine ${b.machineId} is at its hard concurrency limit`);
  b.inflight++;
  let released = false;
  const release = () => {
    if (!released) b.inflight--;
    released = true;
  };
  const up = connect({ host: b.address, port: b.port, allowHalfOpen: true, noDelay: true });
  const timer = setTimeout(() => up.destroy(), connectMs);
  let ready = false;
  up.on('error', () => up.destroy());
  up.once('connect', () => {
    clearTimeout(timer);
    ready = true;
    client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
    if (head.length > 0) up.write(head);
    client.pipe(up);
    up.pipe(client);
  });
  up.on('close', () => {
    clearTimeout(timer);
    release();
    if (!ready) refuse('502 Bad Gateway', 'backend_unreachable', `could not reach machine ${b.machineId}`);
    else closeSoon(client);
  });
  client.on('close', () => {
    if (ready) closeSoon(up);
    else up.destroy();
  });
}
