// Forwarding of names outside `.internal` to the host's upstream resolvers, over UDP (one fresh socket per query) or TCP.
import { createSocket } from 'node:dgram';
import { connect, isIP } from 'node:net';
import { TarmacError } from '../shared/errors.ts';

/** An upstream resolver. */
export interface Upstream {
  host: string;
  port: number;
}

/** Parses "1.2.3.4", "1.2.3.4:53", "::1" or "[::1]:53". */
export function parseUpstream(value: string): Upstream {
  const bracketed = /^\[([^\]]+)\](?::(\d+))?$/.exec(value);
  const [host, port] = bracketed
    ? [bracketed[1]!, bracketed[2]]
    : isIP(value) === 6 ? [value, undefined] : (value.split(':') as [string, string | undefined]);
  const p = port === undefined ? 53 : Number(port);
  if (isIP(host) === 0 || !Number.isInteger(p) || p < 1 || p > 65535) {
    throw new TarmacError('invalid_argument', `dns.upstreams: "${value}" is not an address like 1.1.1.1, 10.0.0.2:53 or [::1]:53`);
  }
  return { host, port: p };
}

/** The `nameserver` lines of a resolv.conf text (scoped link-local addresses kept with their zone). */
export function upstreamsFromResolvConf(text: string): Upstream[] {
  const out: Upstream[] = [];
  for (const line of text.split('\n')) {
    const m = /^\s*nameserver\s+(\S+)/.exec(line);
    if (m && isIP(m[1]!.split('%')[0]!) !== 0) out.push({ host: m[1]!, port: 53 });
  }
  return out;
}

export interface ForwarderOptions {
  upstreams: readonly Upstream[];
  /** How long one upstream gets before the next is tried. */
  timeoutMs: number;
  /** Forwards in flight at most; more are refused with SERVFAIL rather than opening ever more sockets. */
  maxInflight: number;
}

/** Sends queries on to the upstreams in order until one answers. */
export class Forwarder {
  readonly #opts: ForwarderOptions;
  #inflight = 0;

  constructor(opts: ForwarderOptions) {
    this.#opts = opts;
  }

  /** The upstream's answer to `query` (the client's bytes, passed through), or undefined when none answered. */
  async forward(query: Buffer, tcp: boolean): Promise<Buffer | undefined> {
    if (this.#inflight >= this.#opts.maxInflight) return undefined;
    this.#inflight++;
    try {
      for (const u of this.#opts.upstreams) {
        const answer = await (tcp ? this.#tcp(u, query) : this.#udp(u, query)).catch(() => undefined);
        if (answer) return answer;
      }
      return undefined;
    } finally {
      this.#inflight--;
    }
  }

  #udp(u: Upstream, query: Buffer): Promise<Buffer | undefined> {
    return new Promise((resolve) => {
      const sock = createSocket(isIP(u.host.split('%')[0]!) === 6 ? 'udp6' : 'udp4');
      const done = (answer: Buffer | undefined) => {
        clearTimeout(timer);
        sock.close();
        resolve(answer);
      };
      const timer = setTimeout(() => done(undefined), this.#opts.timeoutMs);
      sock.on('error', () => done(undefined));
      sock.on('message', (msg, rinfo) => {
        if (rinfo.port === u.port && isAnswerTo(msg, query)) done(msg);
      });
      sock.send(query, u.port, u.host);
    });
  }

  #tcp(u: Upstream, query: Buffer): Promise<Buffer | undefined> {
    return new Promise((resolve) => {
      const sock = connect({ host: u.host, port: u.port });
      let buf = Buffer.alloc(0);
      const done = (answer: Buffer | undefined) => {
        clearTimeout(timer);
        sock.destroy();
        resolve(answer);
      };
      const timer = setTimeout(() => done(undefined), this.#opts.timeoutMs);
      sock.on('error', () => done(undefined));
      sock.on('close', () => done(undefined));
      sock.on('connect', () => {
        const len = Buffer.alloc(2);
        len.writeUInt16BE(query.length);
        sock.end(Buffer.concat([len, query]));
      });
      sock.on('data', (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        if (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) {
          const msg = buf.subarray(2, 2 + buf.readUInt16BE(0));
          done(isAnswerTo(msg, query) ? msg : undefined);
        }
      });
    });
  }
}

/** A response (QR set) with the query's id. */
function isAnswerTo(msg: Buffer, query: Buffer): boolean {
  return msg.length >= 12 && (msg[2]! & 0x80) !== 0 && msg[0] === query[0] && msg[1] === query[1];
}
