// The DNS server: UDP and TCP listeners answering `.internal` from the zone (answers encoded once, then spliced) and forwarding the rest.
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import { createServer, isIP, type Server, type Socket } from 'node:net';
import type { DnsListen, DnsServerOptions, RunningDns } from './engine.ts';
import { privateNetwork, sourceList } from './address.ts';
import { Forwarder } from './forward.ts';
import { Zone, soaRecord, zoneName, type View } from './zone.ts';
import { encodeTemplate, headerResponse, parseQuery, qtypes, rcode, spliceResponse, udpLimit, type Query, type Template } from './wire.ts';

export type { DnsListen, DnsServerOptions, RunningDns } from './engine.ts';

/** Encoded answers kept at most (then the cache starts over: a flood of random names cannot grow it unbounded). */
const maxCached = 50_000;
const tcpIdleMs = 10_000;
const rebindMs = 2000;

/** Starts the server; resolves once every listener is bound or being retried (address in use). */
export async function startDnsServer(opts: DnsServerOptions): Promise<RunningDns> {
  const server = new DnsServer(opts);
  try {
    await Promise.all(opts.listen.map((l) => server.bind(l)));
  } catch (e) {
    await server.close();
    throw e;
  }
  return server;
}

class DnsServer implements RunningDns {
  readonly engine = 'node' as const;
  readonly #opts: DnsServerOptions;
  readonly #zone: Zone;
  readonly #trusted: (address: string) => boolean;
  readonly #forwarder: Forwarder;
  readonly #unsubscribe: () => void;
  readonly #answers = new Map<string, Template>();
  /** Views by source address (null: refused); cleared with the answers on every zone change. */
  readonly #views = new Map<string, View | null>();
  readonly #udp: UdpSocket[] = [];
  readonly #tcp: Server[] = [];
  readonly #conns = new Set<Socket>();
  readonly #bound: DnsListen[] = [];
  readonly #retries = new Set<NodeJS.Timeout>();
  #closed = false;
  #lastBugLog = 0;

  constructor(opts: DnsServerOptions) {
    this.#opts = opts;
    this.#trusted = sourceList(opts.trusted);
    this.#zone = new Zone(opts.catalog);
    const own = new Set(opts.listen.map((l) => `${l.host}:${l.port}`));
    this.#forwarder = new Forwarder({
      upstreams: opts.upstreams.filter((u) => !own.has(`${u.host}:${u.port}`)), // never forward to ourselves
      timeoutMs: opts.forwardTimeoutMs ?? 2000,
      maxInflight: 1024,
    });
    this.#unsubscribe = opts.catalog.subscribe((batch) => {
      const before = this.#zone.generation;
      this.#zone.apply(batch);
      if (this.#zone.generation !== before) {
        this.#answers.clear();
        this.#views.clear();
      }
    });
  }

  listening(): DnsListen[] {
    return [...this.#bound];
  }

  pid(): number {
    return process.pid;
  }

  /** Binds UDP and TCP on one address; an address in use (or not yet configured) is retried every 2 s. */
  async bind(l: DnsListen): Promise<void> {
    try {
      await this.#bindOnce(l);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      // Port 0: the UDP port's TCP twin was taken by someone else; another pair will do.
      if (l.port === 0 && code === 'EADDRINUSE') return this.#bindOnce(l).catch(() => this.#bindOnce(l));
      if (code !== 'EADDRINUSE' && code !== 'EADDRNOTAVAIL') throw e;
      this.#opts.log.warn({ host: l.host, port: l.port, code }, 'dns listener unavailable, retrying in the background');
      const retry = () => {
        this.#retries.delete(timer);
        if (this.#closed) return;
        this.#bindOnce(l).then(
          () => this.#opts.log.info({ host: l.host, port: l.port }, 'dns listener bound'),
          () => { if (!this.#closed) this.#retries.add((timer = setTimeout(retry, rebindMs).unref())); },
        );
      };
      let timer = setTimeout(retry, rebindMs).unref();
      this.#retries.add(timer);
    }
  }

  async #bindOnce(l: DnsListen): Promise<void> {
    const udp = createSocket({ type: isIP(l.host) === 6 ? 'udp6' : 'udp4' });
    try {
      await new Promise<void>((resolve, reject) => {
        udp.once('error', reject);
        udp.bind(l.port, l.host, () => {
          udp.off('error', reject);
          resolve();
        });
      });
    } catch (e) {
      udp.close();
      throw e;
    }
    const port = udp.address().port;
    const tcp = createServer((s) => this.#onConnection(s));
    tcp.maxConnections = 512;
    try {
      await new Promise<void>((resolve, reject) => {
        tcp.once('error', reject);
        tcp.listen(port, l.host, () => {
          tcp.off('error', reject);
          resolve();
        });
      });
    } catch (e) {
      udp.close();
      throw e;
    }
    if (this.#closed) {
      udp.close();
      tcp.close();
      return;
    }
    udp.on('error', (e) => this.#bug(e));
    tcp.on('error', (e) => this.#bug(e));
    udp.on('message', (msg, rinfo) => this.#onDatagram(udp, msg, rinfo.address, rinfo.port));
    this.#udp.push(udp);
    this.#tcp.push(tcp);
    this.#bound.push({ host: l.host, port });
  }

  #onDatagram(sock: UdpSocket, msg: Buffer, address: string, port: number): void {
    try {
      const out = this.#respond(msg, address, false);
      if (out === undefined) return;
      if (out instanceof Promise) out.then((b) => { if (b && !this.#closed) sock.send(b, port, address); }, (e: unknown) => this.#bug(e));
      else sock.send(out, port, address);
    } catch (e) {
      this.#bug(e);
    }
  }

  #onConnection(s: Socket): void {
    this.#conns.add(s);
    s.setTimeout(tcpIdleMs, () => s.destroy());
    s.on('close', () => this.#conns.delete(s));
    s.on('error', () => s.destroy());
    let buf: Buffer = Buffer.alloc(0);
    const send = (out: Buffer | undefined) => {
      if (!out || s.destroyed) return;
      const len = Buffer.allocUnsafe(2);
      len.writeUInt16BE(out.length);
      s.write(Buffer.concat([len, out]));
    };
    s.on('data', (d: Buffer) => {
      buf = buf.length === 0 ? d : Buffer.concat([buf, d]);
      while (buf.length >= 2) {
        const len = buf.readUInt16BE(0);
        if (buf.length < 2 + len) break;
        const msg = buf.subarray(2, 2 + len);
        buf = buf.subarray(2 + len);
        try {
          const out = this.#respond(msg, s.remoteAddress ?? '', true);
          if (out instanceof Promise) out.then(send, (e: unknown) => this.#bug(e));
          else send(out);
        } catch (e) {
          this.#bug(e);
        }
      }
    });
  }

  /** The response to one message from `address`, undefined to drop it. */
  #respond(msg: Buffer, address: string, tcp: boolean): Buffer | Promise<Buffer | undefined> | undefined {
    const parsed = parseQuery(msg);
    if (parsed.kind === 'drop') return undefined;
    if (parsed.kind === 'error') return headerResponse(msg, parsed.rcode, parsed.questionEnd, parsed.edns);
    const q = parsed.query;
    const view = this.#viewOf(address);
    if (!view) return headerResponse(msg, rcode.refused, q.questionEnd, q.edns);
    if (q.edns && q.edns.version > 0) return headerResponse(msg, rcode.noerror, q.questionEnd, q.edns, { extendedRcode: 1 }); // BADVERS
    if (q.name === zoneName || q.name.endsWith(`.${zoneName}`)) return this.#internal(msg, q, view, tcp);
    return this.#forwarder.forward(msg, tcp).then((b) => b ?? headerResponse(msg, rcode.servfail, q.questionEnd, q.edns));
  }

  #internal(msg: Buffer, q: Query, view: View, tcp: boolean): Buffer {
    if (q.qclass !== 1 && q.qclass !== qtypes.ANY) return headerResponse(msg, rcode.refused, q.questionEnd, q.edns);
    if (q.qtype === qtypes.AXFR || q.qtype === qtypes.IXFR) return headerResponse(msg, rcode.refused, q.questionEnd, q.edns);
    const key = `${view.org ?? ''}\0${view.region}\0${q.qtype}\0${q.edns ? 1 : 0}\0${q.name}`;
    let tpl = this.#answers.get(key);
    if (tpl === undefined) {
      const r = this.#zone.resolve(view, q.name, q.qtype);
      tpl = encodeTemplate(r.rcode, r.answers, r.negative ? [soaRecord()] : [], q.edns !== undefined);
      if (this.#answers.size >= maxCached) this.#answers.clear();
      this.#answers.set(key, tpl);
    }
    const out = spliceResponse(tpl, msg, q);
    if (!tcp && out.length > udpLimit(q)) {
      return headerResponse(msg, tpl[3]! & 0x0f, q.questionEnd, q.edns, { truncated: true, authoritative: true });
    }
    return out;
  }

  /**
   * What a source sees: a machine (a private fdaa: address of a known org) its org's names, a trusted source every
   * org's; anyone else is refused (null).
   */
  #viewOf(address: string): View | null {
    let view = this.#views.get(address);
    if (view !== undefined) return view;
    const network = privateNetwork(address);
    const org = network === undefined ? undefined : this.#zone.orgOfNetwork(network);
    if (org !== undefined) view = { org, region: this.#zone.regionOfAddress(address) ?? this.#opts.region };
    else view = this.#trusted(address) ? { org: undefined, region: this.#opts.region } : null;
    if (this.#views.size >= maxCached) this.#views.clear();
    this.#views.set(address, view);
    return view;
  }

  /** A bug on the query path: logged (at most every 10 s, a flood must not flood the log), never fatal. */
  #bug(e: unknown): void {
    const now = Date.now();
    if (now - this.#lastBugLog < 10_000) return;
    this.#lastBugLog = now;
    this.#opts.log.error({ err: e }, 'dns query failed');
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#unsubscribe();
    for (const t of this.#retries) clearTimeout(t);
    for (const s of this.#conns) s.destroy();
    await Promise.all([
      ...this.#udp.map((u) => new Promise<void>((resolve) => u.close(() => resolve()))),
      ...this.#tcp.map((t) => new Promise<void>((resolve) => t.close(() => resolve()))),
    ]);
  }
}
