// The unbound engine: Tarmac's zone compiled into unbound views (one per org, one for trusted sources), unbound run as a child and kept current over its control socket (the unbound-control protocol).
import { spawn, type ChildProcess } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { existsSync } from 'node:fs';
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { connect, createServer, isIP } from 'node:net';
import { join, resolve as absolute } from 'node:path';
import { createInterface } from 'node:readline';
import { networkCidr } from '../catalog/index.ts';
import { TarmacError } from '../shared/errors.ts';
import type { DnsListen, DnsServerOptions, RunningDns } from './engine.ts';
import { internalTtl, Zone, zoneName, type PrecompiledNames, type View } from './zone.ts';

export const unboundBinary = '/usr/sbin/unbound';
const setprivBinary = '/usr/bin/setpriv';

/**
 * `top<N>.nearest.of.<app>` names compiled per app: N = 1..16 (each with min(N, started machines) addresses). A larger
 * N gets NXDOMAIN from this engine (the Node engine answers any N up to 9999 with every machine).
 */
export const topCap = 16;
/** Catalog batches arriving within this many ms are applied together. */
const debounceMs = 5;
const rebindMs = 2000;
const readyTimeoutMs = 15_000;
/**
 * unbound never frees the memory of local data it removes (its zone regions only grow until the zone is rebuilt): after
 * removing records of about this many bytes (as text) the whole data set is reloaded from a fresh config, which starts
 * the regions over. A reload stops answers while unbound reads the config (about 0.6 s for 5000 machines here).
 */
const compactAfterRemovedBytes = 32 << 20;
/** unbound's control socket takes lines of at most 2048 bytes; a record longer than this goes through a config reload instead. */
const maxControlLine = 2000;
/**
 * A TXT list longer than this many characters (a big `_instances.internal`, `vms.<app>`, `_apps`) is served as several
 * TXT records of whole entries, each but the last ending with the list's separator, in order: concatenated, they are
 * the Node engine's single record. One control-socket line holds each of them, so they change without a reload.
 */
const txtRecordMax = 1500;
/** A TXT list longer than this cannot be answered at all (a DNS message holds 64 KiB): left out, with a warning. */
const maxTxtList = 60_000;
/** The type of the placeholder that makes a name without records exist (a private-use type nobody asks for). */
const placeholderType = 'TYPE65280';

export interface UnboundDnsOptions extends DnsServerOptions {
  /** Where the generated config, the control socket and the pid file live (e.g. `<data_dir>/dns`). */
  stateDir: string;
}

/** A name's records as unbound local-data lines, in the order they are served. */
type ViewData = Map<string, string[]>;

interface ViewSpec {
  /** unbound's view name. */
  name: string;
  /** Sources that get this view. */
  sources: string[];
  zoneView: View;
}

/** Starts unbound with the current zone and keeps it current; resolves once it answers (addresses in use are retried). */
export async function startUnboundDns(opts: UnboundDnsOptions): Promise<RunningDns> {
  if (!existsSync(unboundBinary)) {
    throw new TarmacError('failed_precondition', `dns.engine "unbound" needs ${unboundBinary} (apt-get install unbound), or set dns.engine = "node"`);
  }
  const dns = new UnboundDns(opts);
  try {
    await dns.start();
  } catch (e) {
    await dns.close();
    throw e;
  }
  return dns;
}

class UnboundDns implements RunningDns {
  readonly engine = 'unbound' as const;
  readonly #opts: UnboundDnsOptions;
  readonly #zone: Zone;
  readonly #unsubscribe: () => void;
  readonly #conf: string;
  readonly #pidFile: string;
  /** unbound's control socket (unix, no TLS), spoken to directly: no process per command. */
  readonly #ctl: string;
  /** Listen addresses with their ports fixed (port 0 replaced by a free one), and those in use by someone else. */
  #listen: DnsListen[] = [];
  #deferred: DnsListen[] = [];
  #bound: DnsListen[] = [];
  #child: ChildProcess | undefined;
  /** What unbound holds: view set key, and the records per view. */
  #loadedViews = '';
  #loaded = new Map<string, ViewData>();
  /** Compiled names per view and app, with the zone's token they were compiled for. */
  #compiled = new Map<string, { token: object; data: ViewData }>();
  #removedSinceLoad = 0;
  /** Every operation on unbound, one at a time. */
  #queue: Promise<void> = Promise.resolve();
  #dirty: NodeJS.Timeout | undefined;
  #timers = new Set<NodeJS.Timeout>();
  #backoffMs = 250;
  #restarting = false;
  #started = false;
  #reloadTimer: NodeJS.Timeout | undefined;
  #lastReload = 0;
  #lastReloadMs = 0;
  #closed = false;
  #recentLog: string[] = [];
  /** TXT lists too long to answer, logged once each. */
  readonly #warnedLong = new Set<string>();
  readonly #tooLong = (name: string): void => {
    if (this.#warnedLong.has(name) || this.#warnedLong.size > 1000) return;
    this.#warnedLong.add(name);
    this.#opts.log.warn({ name, max: maxTxtList }, 'dns TXT list too long for a DNS message, not served');
  };

  constructor(opts: UnboundDnsOptions) {
    this.#opts = { ...opts, stateDir: absolute(opts.stateDir) }; // unbound changes into it: every path absolute
    this.#conf = join(this.#opts.stateDir, 'unbound.conf');
    this.#pidFile = join(this.#opts.stateDir, 'unbound.pid');
    this.#ctl = join(this.#opts.stateDir, 'unbound.ctl');
    this.#zone = new Zone(opts.catalog);
    this.#unsubscribe = opts.catalog.subscribe((batch) => {
      const before = this.#zone.generation;
      this.#zone.apply(batch);
      if (this.#zone.generation !== before) this.#schedule();
    });
  }

  listening(): DnsListen[] {
    return [...this.#bound];
  }

  pid(): number | undefined {
    return this.#child?.pid;
  }

  async start(): Promise<void> {
    await mkdir(this.#opts.stateDir, { recursive: true, mode: 0o755 });
    await this.#killStale();
    for (let attempt = 1; ; attempt++) {
      this.#listen = [];
      this.#deferred = [];
      for (const l of this.#opts.listen) {
        const fixed = l.port === 0 ? { host: l.host, port: await freePort(l.host) } : { ...l };
        if ((await probeListen(fixed)) === 'in-use') this.#deferred.push(fixed);
        else this.#listen.push(fixed);
      }
      try {
        await this.#enqueue(() => this.#launch());
        break;
      } catch (e) {
        // A port picked for port 0 can be taken by someone else before unbound binds it: pick again.
        if (attempt >= 3 || !this.#opts.listen.some((l) => l.port === 0) || this.#closed) throw e;
      }
    }
    this.#started = true;
    for (const l of this.#deferred) {
      this.#opts.log.warn({ host: l.host, port: l.port, code: 'EADDRINUSE' }, 'dns listener unavailable, retrying in the background');
    }
    if (this.#deferred.length > 0) this.#later(rebindMs, () => this.#retryDeferred());
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#unsubscribe();
    if (this.#dirty) clearTimeout(this.#dirty);
    if (this.#reloadTimer) clearTimeout(this.#reloadTimer);
    for (const t of this.#timers) clearTimeout(t);
    const child = this.#child;
    if (child) await stopChild(child);
    await this.#queue.catch(() => {});
    this.#bound = [];
  }

  // ---- the process

  /** Writes the config with every record, starts unbound and waits until it answers its control socket. */
  async #launch(): Promise<void> {
    if (this.#closed) return;
    if (this.#listen.length === 0) return; // every address in use: started once one is free (unbound would take localhost:53)
    const { views, data } = this.#desired();
    await this.#writeConfig(views, data);
    const listen = [...this.#listen];
    const [bin, ...args] = existsSync(setprivBinary)
      ? [setprivBinary, '--pdeathsig', 'KILL', '--', unboundBinary, '-d', '-c', this.#conf] // dies with this process
      : [unboundBinary, '-d', '-c', this.#conf];
    const child = spawn(bin!, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    this.#child = child;
    this.#recentLog = [];
    createInterface({ input: child.stderr! }).on('line', (line) => this.#onLog(line));
    const exited = new Promise<string>((resolve) => {
      child.once('error', (e) => resolve(e.message));
      child.once('exit', (code, signal) => resolve(signal ? `signal ${signal}` : `exit code ${code}`));
    });
    void exited.then((how) => this.#onExit(child, how));
    const deadline = Date.now() + readyTimeoutMs;
    let gone: string | undefined;
    void exited.then((how) => { gone = how; });
    for (;;) {
      if (gone !== undefined || this.#closed) {
        throw new TarmacError('unavailable', `unbound did not start (${gone ?? 'closed'}): ${this.#recentLog.slice(-3).join(' | ') || 'no output'}`);
      }
      if (await control(this.#ctl, ['status']).then(() => true, () => false)) break;
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new TarmacError('unavailable', `unbound did not answer on its control socket within ${readyTimeoutMs} ms`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    this.#loaded = data;
    this.#loadedViews = viewsKey(views);
    this.#removedSinceLoad = 0;
    this.#bound = listen;
    this.#opts.log.info({ pid: child.pid, listen, views: views.length }, 'unbound serving');
  }

  /** unbound exited: unless closing, start it again (with everything) after a growing pause. */
  #onExit(child: ChildProcess, how: string): void {
    if (this.#child !== child) return;
    this.#child = undefined;
    this.#bound = [];
    if (this.#closed || !this.#started) return; // start() reports (or retries) a first launch that fails
    this.#opts.log.error({ how, last: this.#recentLog.slice(-3) }, 'unbound exited, restarting it');
    this.#restartLater();
  }

  #restartLater(): void {
    if (this.#restarting || this.#closed) return;
    this.#restarting = true;
    const wait = this.#backoffMs;
    this.#backoffMs = Math.min(this.#backoffMs * 2, 5000);
    this.#later(wait, () => {
      void this.#enqueue(async () => {
        if (this.#child || this.#closed) return;
        await this.#reprobe();
        await this.#launch();
        this.#backoffMs = 250;
      }).catch((e: unknown) => this.#opts.log.error({ err: e }, 'unbound restart failed')).finally(() => {
        this.#restarting = false;
        if (!this.#child && !this.#closed && this.#listen.length > 0) this.#restartLater();
      });
    });
  }

  /** Before a restart: addresses someone else took meanwhile wait in the background. */
  async #reprobe(): Promise<void> {
    const keep: DnsListen[] = [];
    for (const l of this.#listen) {
      if ((await probeListen(l)) === 'in-use') this.#deferred.push(l);
      else keep.push(l);
    }
    if (keep.length !== this.#listen.length) {
      for (const l of this.#listen.filter((x) => !keep.includes(x))) {
        this.#opts.log.warn({ host: l.host, port: l.port, code: 'EADDRINUSE' }, 'dns listener unavailable, retrying in the background');
      }
      this.#later(rebindMs, () => this.#retryDeferred());
    }
    this.#listen = keep;
  }

  /** Addresses that were in use: once free, unbound restarts listening on them too (it cannot add a listener live). */
  #retryDeferred(): void {
    void this.#enqueue(async () => {
      const free: DnsListen[] = [];
      for (const l of this.#deferred) if ((await probeListen(l)) !== 'in-use') free.push(l);
      if (free.length > 0) {
        this.#deferred = this.#deferred.filter((l) => !free.includes(l));
        this.#listen.push(...free);
        const child = this.#child;
        if (child) {
          this.#child = undefined;
          await stopChild(child);
        }
        await this.#launch();
        for (const l of free) this.#opts.log.info({ host: l.host, port: l.port }, 'dns listener bound');
      }
    }).catch((e: unknown) => this.#opts.log.error({ err: e }, 'dns listener retry failed')).finally(() => {
      if (this.#deferred.length > 0) this.#later(rebindMs, () => this.#retryDeferred());
      if (!this.#child && !this.#closed && this.#listen.length > 0) this.#restartLater();
    });
  }

  #onLog(line: string): void {
    const m = /^\[\d+\] [^:]+:\d+\] ([a-z ]+): (.*)$/.exec(line);
    const level = m?.[1] ?? 'info';
    const msg = m?.[2] ?? line;
    this.#recentLog.push(msg);
    if (this.#recentLog.length > 20) this.#recentLog.shift();
    const log = this.#opts.log;
    if (level.includes('error')) log.error({ unbound: msg }, 'unbound');
    else if (level === 'warning') log.warn({ unbound: msg }, 'unbound');
    else log.debug({ unbound: msg }, 'unbound');
  }

  /** An unbound left by an earlier run of this data dir (its pid file names a process running our config) is stopped. */
  async #killStale(): Promise<void> {
    const pid = Number((await readFile(this.#pidFile, 'utf8').catch(() => '')).trim());
    if (!Number.isInteger(pid) || pid <= 0) return;
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (!cmdline.includes(this.#conf)) return;
    try {
      process.kill(pid, 'SIGKILL');
      this.#opts.log.warn({ pid }, 'stopped an unbound left by an earlier run');
    } catch {
      // gone meanwhile
    }
    const deadline = Date.now() + 5000;
    while (existsSync(`/proc/${pid}`) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  }

  // ---- keeping the data current

  #schedule(): void {
    if (this.#dirty || this.#closed) return;
    this.#dirty = setTimeout(() => {
      this.#dirty = undefined;
      void this.#enqueue(() => this.#sync()).catch((e: unknown) => {
        // unbound may now hold part of the change: the next try reloads everything.
        this.#opts.log.error({ err: e }, 'dns update failed, retrying with a reload');
        this.#loadedViews = '';
        this.#later(1000, () => this.#schedule());
      });
    }, debounceMs);
  }

  /**
   * Brings unbound to the zone: the changed names over the control socket. A config reload instead when the views
   * changed (an org came or went) or after many removals (compaction). A record still too long for the control socket
   * (long TXT lists are split, so only a pathological one) waits for a rate-limited reload; the other names change at once.
   */
  async #sync(): Promise<void> {
    if (!this.#child || this.#closed) return; // a (re)start loads everything anyway
    const started = performance.now();
    const { views, data } = this.#desired();
    const viewsChanged = viewsKey(views) !== this.#loadedViews;
    const plan = viewsChanged ? undefined : diff(this.#loaded, data);
    if (!plan || this.#removedSinceLoad + plan.removedBytes > compactAfterRemovedBytes) {
      await this.#reload(views, data, plan ? 'compaction' : 'views changed');
      return;
    }
    // New names and grown record sets first (nothing gets worse), then per view the removals and re-adds back to back
    // (two commands on the socket: a query can fall between them, for well under a millisecond).
    let commands = 0;
    const send = async (args: string[], items: string[]) => {
      // At most 64 KiB per command: unbound reads a command's lines with the whole server waiting, so each one must
      // fit the socket buffer at once rather than trickle in as this process gets to write it.
      for (const chunk of chunks(items, 64 << 10)) {
        await control(this.#ctl, args, chunk.join('\n') + '\n');
        commands++;
      }
    };
    for (const [view, lines] of plan.add) await send(['view_local_datas', view], lines);
    for (const [view, names] of plan.remove) {
      await send(['view_local_datas_remove', view], names.map((n) => `${n}.`));
      const lines = plan.readd.get(view);
      if (lines && lines.length > 0) await send(['view_local_datas', view], lines);
    }
    for (const [view, name] of plan.deferred) { // unbound still has the old records of these
      const old = this.#loaded.get(view)?.get(name);
      if (old) data.get(view)!.set(name, old);
      else data.get(view)!.delete(name);
    }
    this.#loaded = data;
    this.#removedSinceLoad += plan.removedBytes;
    this.#opts.log.debug({ ms: Math.round(performance.now() - started), commands, deferred: plan.deferred.length }, 'unbound updated');
    if (plan.deferred.length > 0) this.#reloadSoon();
  }

  async #reload(views: ViewSpec[], data: Map<string, ViewData>, reason: string): Promise<void> {
    const started = Date.now();
    await this.#writeConfig(views, data);
    await control(this.#ctl, ['reload']);
    await waitControl(this.#ctl);
    this.#loaded = data;
    this.#loadedViews = viewsKey(views);
    this.#removedSinceLoad = 0;
    this.#lastReloadMs = Date.now() - started;
    this.#lastReload = Date.now();
    this.#opts.log.debug({ views: views.length, reason, ms: this.#lastReloadMs }, 'unbound reloaded');
  }

  #reloadSoon(): void {
    if (this.#reloadTimer || this.#closed) return;
    // At most 5% of the time reloading (unbound answers nothing meanwhile), and at most once a second.
    const wait = Math.max(0, this.#lastReload + Math.max(1000, 20 * this.#lastReloadMs) - Date.now());
    this.#reloadTimer = setTimeout(() => {
      this.#reloadTimer = undefined;
      if (this.#closed) return;
      void this.#enqueue(async () => {
        if (!this.#child || this.#closed) return;
        const { views, data } = this.#desired();
        await this.#reload(views, data, 'long records');
      }).catch((e: unknown) => {
        this.#opts.log.error({ err: e }, 'dns reload failed, retrying');
        this.#loadedViews = '';
        this.#later(1000, () => this.#schedule());
      });
    }, wait);
    this.#reloadTimer.unref();
  }

  /**
   * The views unbound should have and every view's records, from the zone. An app's names are compiled again only when
   * its token changed (its machines or row), so a change costs about its own app, not the fleet.
   */
  #desired(): { views: ViewSpec[]; data: Map<string, ViewData> } {
    const region = this.#opts.region;
    const views: ViewSpec[] = [];
    if (this.#opts.trusted.length > 0) views.push({ name: 'trusted', sources: [...this.#opts.trusted], zoneView: { org: undefined, region } });
    for (const o of this.#zone.orgs()) views.push({ name: `org-${o.network}`, sources: [networkCidr(o.network)], zoneView: { org: o.slug, region } });
    const data = new Map<string, ViewData>();
    const cache = new Map<string, { token: object; data: ViewData }>();
    for (const v of views) {
      const out: ViewData = new Map();
      for (const app of this.#zone.appNames(v.zoneView)) {
        const key = `${v.name}\0${app}`;
        const token = this.#zone.appToken(app);
        let hit = this.#compiled.get(key);
        if (!hit || hit.token !== token) hit = { token, data: compile(this.#zone.appRecords(v.zoneView, app, topCap), this.#tooLong) };
        cache.set(key, hit);
        for (const [name, lines] of hit.data) out.set(name, lines);
      }
      for (const [name, lines] of compile(this.#zone.listRecords(v.zoneView), this.#tooLong)) out.set(name, lines);
      data.set(v.name, out);
    }
    this.#compiled = cache;
    return { views, data };
  }

  async #writeConfig(views: ViewSpec[], data: Map<string, ViewData>): Promise<void> {
    const text = unboundConfig({
      stateDir: this.#opts.stateDir, ctl: this.#ctl, pidFile: this.#pidFile, listen: this.#listen, views, data,
      forwardTimeoutMs: this.#opts.forwardTimeoutMs,
      upstreams: this.#opts.upstreams.filter((u) => !this.#opts.listen.some((l) => l.host === u.host && l.port === u.port)
        && !this.#listen.some((l) => l.host === u.host && l.port === u.port)), // never forward to ourselves
    });
    await writeFile(`${this.#conf}.tmp`, text, { mode: 0o644 });
    await rename(`${this.#conf}.tmp`, this.#conf);
  }

  #enqueue(op: () => Promise<void>): Promise<void> {
    const run = this.#queue.then(op);
    this.#queue = run.catch(() => {});
    return run;
  }

  #later(ms: number, fn: () => void): void {
    const t = setTimeout(() => {
      this.#timers.delete(t);
      if (!this.#closed) fn();
    }, ms);
    t.unref();
    this.#timers.add(t);
  }
}

// ---- records to unbound local-data

const nameOk = (n: string) => n.length <= 253 && /^[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*$/.test(n);
/** A TXT character-string in presentation form: `"` and `\` escaped; `'` (it quotes config lines) and anything unprintable as \DDD. */
const quote = (s: string) => `"${s.replace(/[\\"']|[^\x20-\x7e]/gu, (c) => (c === '"' || c === '\\' ? `\\${c}`
  : [...Buffer.from(c, 'utf8')].map((b) => `\\${String(b).padStart(3, '0')}`).join('')))}"`;

/** Text of a TXT record split into DNS character-strings of at most 255 bytes, as the Node engine splits it. */
function stringsOf(text: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < text.length; i += 255) out.push(text.slice(i, i + 255));
  return out.length > 0 ? out : [''];
}

/** Text per TXT record: one record, unless it would not fit a control-socket line (see `txtRecordMax`). */
function txtParts(name: string, text: string): string[] {
  if (text.length <= txtRecordMax) return [text];
  const sep = name === `_instances.${zoneName}` ? ';' : ',';
  const parts: string[] = [];
  let current = '';
  for (const entry of text.split(sep)) {
    if (current !== '' && current.length + 1 + entry.length > txtRecordMax) {
      parts.push(`${current}${sep}`);
      current = entry;
    } else current = current === '' ? entry : `${current}${sep}${entry}`;
  }
  parts.push(current);
  return parts;
}

/** The zone's records of one view as local-data lines; names unbound cannot hold (odd characters) are left out. */
function compile(r: PrecompiledNames, tooLong: (name: string) => void): ViewData {
  const out: ViewData = new Map();
  for (const [name, answers] of r.records) {
    if (!nameOk(name)) continue;
    const lines: string[] = [];
    for (const a of answers) {
      if (a.type === 'AAAA') {
        if (isIP(String(a.data)) === 6) lines.push(`${name}. ${internalTtl} IN AAAA ${a.data}`); // a bad line would stop unbound
      }
      else if (a.type === 'TXT') {
        const text = (Array.isArray(a.data) ? a.data : [a.data]).map((c) => c.toString()).join('');
        if (text.length > maxTxtList) {
          tooLong(name);
          continue;
        }
        for (const part of txtParts(name, text)) lines.push(`${name}. ${internalTtl} IN TXT ${stringsOf(part).map(quote).join(' ')}`);
      }
    }
    if (lines.length > 0) out.set(name, lines);
  }
  // A name that exists without records (an app with no started machine, its vms/regions/vm/process names): a
  // placeholder record one label below makes it exist, so it answers NODATA rather than NXDOMAIN, as in the zone.
  for (const name of r.empty) {
    if (nameOk(`_.${name}`)) out.set(`_.${name}`, [`_.${name}. ${internalTtl} IN ${placeholderType} \\# 0`]);
  }
  return out;
}

interface Plan {
  add: Map<string, string[]>;
  remove: Map<string, string[]>;
  readd: Map<string, string[]>;
  /** Text size of the records removed (what unbound keeps allocated). */
  removedBytes: number;
  /** Names (view, name) whose new records are longer than the control socket takes: for the next reload. */
  deferred: Array<[string, string]>;
}

/**
 * What to send to turn `from` into `to`, per view. unbound adds records to a name but removes only whole names, so a
 * name whose records only grew gets the new ones added; one that lost records (or whose order matters: top<N>) is
 * removed and added again.
 */
function diff(from: Map<string, ViewData>, to: Map<string, ViewData>): Plan {
  const plan: Plan = { add: new Map(), remove: new Map(), readd: new Map(), removedBytes: 0, deferred: [] };
  const push = (m: Map<string, string[]>, view: string, items: string[]) => {
    if (items.length === 0) return;
    const list = m.get(view);
    if (list) list.push(...items);
    else m.set(view, [...items]);
  };
  for (const [view, want] of to) {
    const have = from.get(view) ?? new Map<string, string[]>();
    for (const [name, lines] of want) {
      const old = have.get(name);
      if (old === lines || (old && old.length === lines.length && old.every((l, i) => l === lines[i]))) continue;
      if (lines.some((l) => l.length > maxControlLine)) {
        plan.deferred.push([view, name]);
        continue;
      }
      const oldSet = new Set(old ?? []);
      // Only address sets may grow in place: top<N> and split TXT lists are ordered, and unbound serves added records first.
      const grown = old !== undefined && !name.startsWith('top') && lines.every((l) => l.includes(' IN AAAA '))
        && old.every((l) => lines.includes(l));
      if (!old) push(plan.add, view, [...lines].reverse()); // unbound serves the last added first
      else if (grown) push(plan.add, view, lines.filter((l) => !oldSet.has(l)));
      else {
        push(plan.remove, view, [name]);
        push(plan.readd, view, [...lines].reverse());
        plan.removedBytes += old.reduce((n, l) => n + l.length, 0);
      }
    }
    for (const [name, old] of have) {
      if (want.has(name)) continue;
      push(plan.remove, view, [name]);
      plan.removedBytes += old.reduce((n, l) => n + l.length, 0);
    }
  }
  return plan;
}

/** `items` in runs of at most `bytes` (as lines). */
function chunks(items: string[], bytes: number): string[][] {
  const out: string[][] = [];
  let run: string[] = [];
  let size = 0;
  for (const item of items) {
    if (run.length > 0 && size + item.length + 1 > bytes) {
      out.push(run);
      run = [];
      size = 0;
    }
    run.push(item);
    size += item.length + 1;
  }
  if (run.length > 0) out.push(run);
  return out;
}

function viewsKey(views: ViewSpec[]): string {
  return views.map((v) => `${v.name}=${v.sources.join(',')}`).join(';');
}

// ---- the config

const q = (s: string) => `"${s}"`;

function at(host: string, port: number): string {
  return `${host}@${port}`;
}

function unboundConfig(o: {
  stateDir: string; ctl: string; pidFile: string; listen: DnsListen[]; views: ViewSpec[]; data: Map<string, ViewData>;
  upstreams: ReadonlyArray<{ host: string; port: number }>; forwardTimeoutMs: number | undefined;
}): string {
  const soa = `${zoneName}. ${internalTtl} IN SOA ns.${zoneName}. hostmaster.${zoneName}. 1 3600 600 86400 ${internalTtl}`;
  const lines = [
    '# Generated by Tarmac (src/dns/unbound.ts) on every start and view change; edits are overwritten.',
    'server:',
    '  verbosity: 1',
    '  use-syslog: no',
    '  logfile: ""',
    '  chroot: ""',
    '  username: ""',
    `  directory: ${q(o.stateDir)}`,
    `  pidfile: ${q(o.pidFile)}`,
    '  do-daemonize: no',
    '  num-threads: 1',
    ...o.listen.map((l) => `  interface: ${at(l.host, l.port)}`),
    '  ip-freebind: yes', // an address that comes later (fdaa::3 before the worker puts it on lo)
    '  so-reuseport: no', // a second server on the same address fails instead of sharing its queries
    '  do-ip4: yes',
    '  do-ip6: yes',
    '  do-udp: yes',
    '  do-tcp: yes',
    '  edns-buffer-size: 1232',
    '  max-udp-size: 1232', // answers over UDP stay within 1232 bytes (else TC) whatever the client offers
    '  module-config: "iterator"', // no DNSSEC validation: .internal is ours and the rest is forwarded
    '  rrset-roundrobin: no', // top<N>: nearest first
    '  do-not-query-localhost: no', // upstreams may be on loopback (127.0.0.53)
    '  do-not-query-address: 0.0.0.0/8', // the placeholder upstream when there is none: SERVFAIL, no packet sent
    // Give up on dead upstreams within about a second (SERVFAIL) rather than retrying for longer than clients wait.
    '  outbound-msg-retry: 1',
    '  max-sent-count: 4',
    ...(o.forwardTimeoutMs !== undefined ? [`  unknown-server-time-limit: ${o.forwardTimeoutMs}`] : []),
    '  msg-cache-size: 4m',
    '  rrset-cache-size: 8m',
    '  access-control: 0.0.0.0/0 refuse',
    '  access-control: ::/0 refuse',
    // unbound allows loopback by default: refused too unless trusted names exactly that block (a narrower one wins anyway)
    ...['127.0.0.0/8', '::1', '::ffff:127.0.0.1'].filter((d) => !o.views.some((v) => v.sources.includes(d))).map((d) => `  access-control: ${d} refuse`),
    ...o.views.flatMap((v) => v.sources.flatMap((s) => [`  access-control: ${s} allow`, `  access-control-view: ${s} ${q(v.name)}`])),
    '',
  ];
  for (const v of o.views) {
    // view-first: no. There are no global local zones to fall back to (unbound adds its defaults, localhost and the
    // like, to a view with local zones); any other name goes on to the forward zone, as the Node engine forwards it.
    lines.push('view:', `  name: ${q(v.name)}`, '  view-first: no', `  local-zone: "${zoneName}." static`, `  local-data: ${q(soa)}`);
    for (const rrs of o.data.get(v.name)?.values() ?? []) for (const rr of rrs) lines.push(`  local-data: '${rr}'`);
    lines.push('');
  }
  lines.push('remote-control:', '  control-enable: yes', `  control-interface: ${q(join(o.stateDir, 'unbound.ctl'))}`, '  control-use-cert: no', '');
  lines.push('forward-zone:', '  name: "."');
  if (o.upstreams.length === 0) lines.push('  forward-addr: 0.0.0.0@53');
  for (const u of o.upstreams) lines.push(`  forward-addr: ${at(u.host, u.port)}`);
  lines.push('');
  return lines.join('\n');
}

// ---- helpers

/**
 * One unbound-control command over the control socket, as unbound-control sends it ("UBCT1 ", the words, a newline; for
 * the commands that read stdin, its lines and an end-of-transmission line); rejects when unbound reports an error.
 */
function control(socket: string, args: string[], stdin?: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const conn = connect(socket);
    let out = '';
    const timer = setTimeout(() => conn.destroy(new Error('no answer within 10 s')), 10_000);
    conn.setEncoding('utf8');
    conn.on('data', (d: string) => { out += d; });
    conn.once('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`unbound control ${args[0]}: ${e.message}`, { cause: e }));
    });
    conn.once('end', () => {
      clearTimeout(timer);
      conn.destroy();
      if (/^(error|no view)/m.test(out) || out === '') reject(new Error(`unbound control ${args.join(' ')}: ${out.trim().split('\n').slice(0, 2).join(' ') || 'no answer'}`));
      else resolve(out);
    });
    conn.write(`UBCT1  ${args.join(' ')}\n${stdin === undefined ? '' : `${stdin}\x04\n`}`);
  });
}

/** Waits for the control socket to answer again (after a reload). */
async function waitControl(conf: string): Promise<void> {
  const deadline = Date.now() + readyTimeoutMs;
  for (;;) {
    try {
      await control(conf, ['status']);
      return;
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await exited;
  clearTimeout(timer);
}

/** A port free for both UDP and TCP on `host` (unbound cannot listen on port 0 and tell which it got). */
async function freePort(host: string): Promise<number> {
  for (let i = 0; i < 20; i++) {
    const udp = createSocket(isIP(host) === 6 ? 'udp6' : 'udp4');
    const port = await new Promise<number>((resolve, reject) => {
      udp.once('error', reject);
      udp.bind(0, host, () => resolve(udp.address().port));
    });
    const ok = await tcpFree(host, port);
    udp.close();
    if (ok === 'free') return port;
  }
  throw new TarmacError('unavailable', `no free port for DNS on ${host}`);
}

/** Whether `l` can be bound (UDP and TCP) now: 'free', 'in-use', or 'not-local' (unbound binds it anyway: ip-freebind). */
async function probeListen(l: DnsListen): Promise<'free' | 'in-use' | 'not-local'> {
  const udp = createSocket(isIP(l.host) === 6 ? 'udp6' : 'udp4');
  const r = await new Promise<'free' | 'in-use' | 'not-local'>((resolve, reject) => {
    udp.once('error', (e: NodeJS.ErrnoException) => {
      try {
        udp.close();
      } catch {
        // never bound
      }
      if (e.code === 'EADDRINUSE') resolve('in-use');
      else if (e.code === 'EADDRNOTAVAIL') resolve('not-local');
      else reject(new TarmacError('invalid_argument', `dns listener ${l.host}:${l.port}: ${e.message}`, { cause: e }));
    });
    udp.bind(l.port, l.host, () => resolve('free'));
  });
  if (r !== 'free') return r;
  const t = await tcpFree(l.host, l.port);
  udp.close();
  return t;
}

function tcpFree(host: string, port: number): Promise<'free' | 'in-use'> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve('in-use'));
    s.listen({ port, host, exclusive: true }, () => s.close(() => resolve('free')));
  });
}
