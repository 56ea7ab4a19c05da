// Request events for HAProxy's data plane: HAProxy logs one line per request into a ring that it forwards over TCP in
// batches; the receiver turns each line into a ProxyRequestEvent.
import { channel } from 'node:diagnostics_channel';
import { createServer, type Server, type Socket } from 'node:net';
import type { Logger } from '../../shared/log.ts';
import { proxyRequestChannel, type ProxyRequestEvent } from '../proxy.ts';

const requestEvents = channel(proxyRequestChannel);

/** First field of every line, naming this layout; a line that does not carry it is not ours. */
const formatTag = 'tm1';

/**
 * The log-format HAProxy's generated config uses; the receiver parses exactly this. Space-separated fields, none of
 * which can hold a space: client input (Host) and the strings set by config (unique id, app) go through `url_enc`, the
 * method is an HTTP token (or `<BADREQ>`), the rest are HAProxy's numbers and names. An empty or unset value logs `-`.
 * It reads `txn.host` and `txn.app`, which the frontend and the app's backend set (sample fetches such as `req.hdr`
 * cannot be used at log time in 2.6, so the Host header has to be kept in a variable first).
 *
 * Fields: tag, unique id, method, host, app, server (`m_<machine id>[_<port>]` or `<NOSRV>`), status (`-1` when no
 * response), total active time in ms, bytes sent to the client (headers included), retries (`+` prefix when
 * redispatched to another server), termination state (2 chars).
 */
export const haproxyLogFormat = `${formatTag} %[unique-id,url_enc] %HM %[var(txn.host),url_enc] %[var(txn.app),url_enc] %s %ST %Ta %B %rc %ts`;

/** The ring HAProxy logs request lines into; its forwarder sends them to the receiver. */
const ringName = 'tarmac-events';

/**
 * Longest line kept, framing excluded. The ring's forwarder silently skips a message whose frame does not fit its 16 kB
 * buffer (`tune.bufsize`), so longer lines are cut to this instead: the receiver counts them as malformed, not lost.
 */
const maxLineBytes = 16000;

/** The `log` line for HAProxy's global section: raw lines (no syslog header) into the ring `haproxyLogSections` declares. */
export function haproxyLogTarget(): string {
  return `log ring@${ringName} len ${maxLineBytes} format raw local0 info`;
}

/**
 * The sections to append to HAProxy's config: the ring, forwarded over TCP to the receiver at `port` on loopback, one
 * octet-counted frame (RFC 6587) per line, many per write. A ring that fills up because the receiver reads too slowly
 * drops events; requests never wait for it.
 */
export function haproxyLogSections(port: number): string[] {
  return [
    [
      `ring ${ringName}`,
      '  description "request events for Tarmac"',
      // The ring's format, not the log line's, decides what is sent: raw is the line alone.
      '  format raw',
      `  maxlen ${maxLineBytes}`,
      // About 30,000 lines; while the receiver is not connected the oldest are overwritten, and sent once it is.
      '  size 4194304',
      '  timeout connect 5s',
      '  timeout server 30s',
      `  server tarmac 127.0.0.1:${port} log-proto octet-count`,
    ].join('\n'),
  ];
}

type Fields = [tag: string, id: string, method: string, host: string, app: string, server: string, status: string, ta: string, bytes: string, retries: string, state: string];
const fieldCount = 11;

/**
 * Parses one line in `haproxyLogFormat` (a syslog header before it is skipped; a trailing newline is allowed).
 * Returns undefined for a line that is not in the format, including one HAProxy truncated.
 */
export function parseHaproxyLogLine(line: string): ProxyRequestEvent | undefined {
  const start = line.startsWith(`${formatTag} `) ? 0 : line.indexOf(` ${formatTag} `) + 1;
  const end = line.charCodeAt(line.length - 1) === 10 ? line.length - 1 : line.length;
  const f = line.slice(start, end).split(' ');
  if (f.length !== fieldCount || f[0] !== formatTag) return undefined;
  const [, id, method, host, app, server, statusField, ta, bytes, retries, state] = f as Fields;
  const logged = Number(statusField);
  const durationMs = Number(ta);
  const sent = Number(bytes);
  if (state.length !== 2 || !Number.isInteger(logged) || !Number.isInteger(durationMs) || !Number.isInteger(sent)) return undefined;

  const machineId = machineOf(server);
  const responseStarted = !endedBeforeResponse(state);
  let error = terminationError(state, logged, machineId !== undefined);
  let status = logged;
  if (status <= 0 || (error === 'client_closed' && !responseStarted)) {
    status = 0;
    error ??= 'client_closed';
  }
  return {
    requestId: decode(id) ?? '',
    method: method === '<BADREQ>' ? '' : method,
    host: decode(host),
    app: decode(app),
    machineId,
    status,
    error,
    // Machines tried: with `option redispatch` a `+` means the last try went to another machine than the first.
    attempts: machineId === undefined ? 0 : retries.charCodeAt(0) === 43 ? 2 : 1,
    durationMs: durationMs < 0 ? 0 : durationMs,
    // HAProxy's %B counts response headers too (no body-only count exists at log time in 2.6); HAProxy's own answers
    // (no server, or the server never answered) count 0, as the Node proxy's do.
    responseBytes: machineId !== undefined && responseStarted ? sent : 0,
  };
}

/** The machine id in a server name `m_<id>` or `m_<id>_<port>`; undefined for `<NOSRV>` and servers that are not machines. */
function machineOf(server: string): string | undefined {
  if (!server.startsWith('m_')) return undefined;
  const portAt = server.indexOf('_', 2);
  return portAt < 0 ? server.slice(2) : server.slice(2, portAt);
}

/** Whether the termination state says the session ended before response headers reached the client. */
function endedBeforeResponse(state: string): boolean {
  const phase = state[1];
  return state[0] !== '-' && (phase === 'R' || phase === 'Q' || phase === 'C' || phase === 'H');
}

/**
 * Maps HAProxy's termination state (first char: who ended the session, second: in which phase; see "Session state
 * at disconnection" in HAProxy's configuration manual) to the Node proxy's error codes.
 */
function terminationError(state: string, status: number, hasServer: boolean): ProxyRequestEvent['error'] {
  const phase = state[1];
  switch (state[0]) {
    case 'C': // the client aborted
      return 'client_closed';
    case 'c': // client timeout: while sending its request HAProxy answers 408
      return phase === 'R' ? 'request_timeout' : 'client_closed';
    case 'S': // the server refused, aborted or sent an invalid response; SC without a server: none was usable
      if (phase === 'C') return hasServer ? 'backend_unreachable' : 'no_machine';
      return phase === 'Q' ? 'over_capacity' : 'backend_error';
    case 's': // server-side timeout: connect, queue, or response
      if (phase === 'C') return 'backend_unreachable';
      return phase === 'Q' ? 'over_capacity' : 'backend_timeout';
    case 'P': // the proxy stopped it: an unparsable request (400), or a response it refused to forward
      if (phase === 'H') return 'backend_error';
      return status === 400 ? 'bad_request' : undefined;
    default:
      return phase === 'Q' ? 'over_capacity' : undefined;
  }
}

const percentEscape = /%([0-9A-Fa-f]{2})/g;

/** Undoes `url_enc` byte for byte (header values are latin1 strings, as node:http gives them); `-` is no value. */
function decode(v: string): string | undefined {
  if (v === '-') return undefined;
  return v.includes('%') ? v.replace(percentEscape, (_, hex: string) => String.fromCharCode(parseInt(hex, 16))) : v;
}

/** Where a message lies in a chunk of the stream: `buf[start, end)`, valid only during the call. */
export type OnFrame = (buf: Buffer, start: number, end: number) => void;

/**
 * Splits an RFC 6587 octet-counted stream (`<length> <message>`, HAProxy's `log-proto octet-count`) into messages, fed
 * chunk by chunk. Messages are handed out as slices of the chunk they arrived in; only a frame split across chunks is
 * copied, once it is complete.
 */
export class OctetCountedFrames {
  readonly #maxLength: number;
  readonly #onFrame: OnFrame;
  /** The unread tail of the stream: the start of a frame that has not fully arrived. */
  #pending: Buffer[] = [];
  #pendingBytes = 0;
  /** Bytes the pending frame needs before it is read again (one more than pending while its length is incomplete). */
  #needed = 0;

  constructor(maxLength: number, onFrame: OnFrame) {
    this.#maxLength = maxLength;
    this.#onFrame = onFrame;
  }

  /** Reads the next chunk of the stream. Returns false when the stream is malformed (a bad length); drop it then. */
  push(chunk: Buffer): boolean {
    let buf = chunk;
    if (this.#pendingBytes > 0) {
      this.#pending.push(chunk);
      this.#pendingBytes += chunk.length;
      if (this.#pendingBytes < this.#needed) return true;
      buf = Buffer.concat(this.#pending, this.#pendingBytes);
      this.#pending = [];
      this.#pendingBytes = 0;
    }
    const end = buf.length;
    let pos = 0;
    while (pos < end) {
      // MSG-LEN = NONZERO-DIGIT *DIGIT, then one space.
      let length = 0;
      let i = pos;
      for (; i < end; i++) {
        const c = buf[i] as number;
        if (c === 32) break;
        if (c < 48 || c > 57 || (c === 48 && i === pos)) return false;
        length = length * 10 + c - 48;
        if (length > this.#maxLength) return false;
      }
      if (i === pos) return false;
      if (i === end) {
        this.#keep(buf, pos, end - pos + 1);
        return true;
      }
      const frameEnd = i + 1 + length;
      if (frameEnd > end) {
        this.#keep(buf, pos, frameEnd - pos);
        return true;
      }
      this.#onFrame(buf, i + 1, frameEnd);
      pos = frameEnd;
    }
    return true;
  }

  #keep(buf: Buffer, from: number, needed: number): void {
    this.#pending.push(buf.subarray(from));
    this.#pendingBytes = buf.length - from;
    this.#needed = needed;
  }
}

/** Receives the request lines HAProxy's ring forwards over TCP and publishes them as ProxyRequestEvents. */
export class HaproxyEventReceiver {
  readonly #server: Server;
  readonly #log: Logger;
  /** HAProxy's forwarders: one per worker process, so several while an old worker of a reload finishes. */
  readonly #connections = new Set<Socket>();
  #malformedLines = 0;
  #malformedStreams = 0;

  /** `<key> ` that every line must start with (what a local process that connects here cannot know); none without a key. */
  readonly #prefix: Buffer | undefined;

  private constructor(server: Server, log: Logger, readonly port: number, readonly key: string | undefined) {
    this.#server = server;
    this.#log = log;
    this.#prefix = key === undefined ? undefined : Buffer.from(`${key} `, 'latin1');
    server.on('connection', (socket) => this.#accept(socket));
    server.on('error', (err) => log.warn({ err }, 'haproxy event listener failed'));
  }

  /**
   * Listens on 127.0.0.1 at a free port; point HAProxy at it with `haproxyLogTarget()`, `haproxyLogSections(port)`
   * and `logFormat`. With a `key`, only lines that start with it count (any local process can connect here).
   */
  static async start(opts: { log: Logger; region?: string; key?: string }): Promise<HaproxyEventReceiver> {
    const server = createServer({ noDelay: true });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
    const log = opts.log.child({ component: 'haproxy-events', ...(opts.region === undefined ? {} : { region: opts.region }) });
    return new HaproxyEventReceiver(server, log, (server.address() as { port: number }).port, opts.key);
  }

  /** The log-format HAProxy must use for this receiver: `haproxyLogFormat`, after the key when there is one. */
  get logFormat(): string {
    return this.key === undefined ? haproxyLogFormat : `${this.key} ${haproxyLogFormat}`;
  }

  /** Lines that were not in `haproxyLogFormat` (truncated ones included) and were dropped. */
  get malformedLines(): number {
    return this.#malformedLines;
  }

  /** Connections closed because their framing was broken. */
  get malformedStreams(): number {
    return this.#malformedStreams;
  }

  /** Stops receiving and drops HAProxy's connections (HAProxy keeps the lines in its ring and retries). */
  close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
    for (const socket of this.#connections) socket.destroy();
    return closed;
  }

  #accept(socket: Socket): void {
    this.#connections.add(socket);
    const frames = new OctetCountedFrames(maxLineBytes, (buf, start, end) => this.#onLine(buf, start, end));
    socket.on('data', (chunk: Buffer) => {
      if (frames.push(chunk)) return;
      this.#malformedStreams++;
      this.#log.debug({ remote: socket.remotePort }, 'haproxy event stream has a malformed frame length; connection closed');
      socket.destroy();
    });
    socket.on('error', (err) => this.#log.debug({ err }, 'haproxy event connection failed'));
    socket.on('close', () => this.#connections.delete(socket));
  }

  #onLine(buf: Buffer, start: number, end: number): void {
    if (!requestEvents.hasSubscribers) return;
    const prefix = this.#prefix;
    if (prefix !== undefined) {
      if (end - start < prefix.length || buf.compare(prefix, 0, prefix.length, start, start + prefix.length) !== 0) {
        this.#malformedLines++;
        return;
      }
      start += prefix.length;
    }
    const line = buf.toString('latin1', start, end);
    const event = parseHaproxyLogLine(line);
    if (event !== undefined) {
      requestEvents.publish(event);
      return;
    }
    if (this.#malformedLines++ === 0) this.#log.debug({ line: line.slice(0, 200) }, 'malformed haproxy log line ignored (logged once)');
  }
}
