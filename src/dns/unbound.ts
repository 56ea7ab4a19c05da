// The unbound engine: Tarmac's zone compiled into unbound views (one per org, one for trusted sources), unbound run as a child and kept current over its control socket (the unbound-control protocol).
import type { ChildProcess } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { existsSync } from 'node:fs';
import { chmod, mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { connect, createServer, isIP } from 'node:net';
import { join, resolve as absolute } from 'node:path';
import { networkCidr } from '../catalog/index.ts';
import { privateNetworkOfRange, sourceList } from './address.ts';
import { spawnTied } from '../shared/child.ts';
import { TarmacError } from '../shared/errors.ts';
import type { DnsListen, DnsServerOptions, RunningDns } from './engine.ts';
import { internalTtl, txtChunks, Zone, zoneName, type PrecompiledNames, type View } from './zone.ts';

export const unboundBinary = '/usr/sbin/unbound';

/**
 * `top<N>.nearest.of.<app>` names compiled per app: N = 1..16 (each with min(N, started machines) addresses). A larger
 * N gets NXDOMAIN from this engine (the Node engine answers any N up to 9999 with every machine).
 */
export const topCap = 16;
/** Catalog batches arriving within this many ms (or five times the last update's time) are applied together. */
const debounceMs = 5;
/** At most this long, however long updates take (five times the last one, else). */
const maxDebounceMs = 250;
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
/** Names the lists own in every view. */
const listNames = [`_apps.${zoneName}`, `_instances.${zoneName}`, `_._apps.${zoneName}`, `_._instances.${zoneName}`];
/** The type of the placeholder that makes a name without records exist (a private-use type nobody asks for). */
const placeholderType = 'TYPE65280';

export interface UnboundDnsOptions extends DnsServerOptions {
  /** Where the generated config, the control socket and the pid file live (e.g. `<data_dir>/dns`). */
  stateDir: string;
  /** The unbound binary (default /usr/sbin/unbound). */
  unboundBinary?: string;
  /** For tests: called at the points where a race with close() or a dying unbound matters, to make it happen. */
  testHooks?: UnboundTestHooks;
}

export interface UnboundTestHooks {
  /** A (re)start wrote the config and is about to spawn unbound. */
  beforeSpawn?(): void | Promise<void>;
  /** A config reload was asked of the unbound whose pid is given; its answer is awaited next. */
  afterReloadSent?(pid: number | undefined): void | Promise<void>;
}

/** A name's records as unbound local-data lines, in the order they are served. */
type ViewData = Map<string, string[]>;

interface ViewState {
  spec: ViewSpec;
  /** Compiled names per app, with the zone's token they were compiled for. */
  apps: Map<string, { token: object; data: ViewData }>;
  /** `_apps` and `_instances`, with the apps and tokens they were compiled for. */
  lists: { apps: string[]; tokens: object[]; data: ViewData } | undefined;
  /** Every name's records. */
  data: ViewData;
}

interface ViewSpec {
  /** unbound's view name. */
  name: string;
  /** Sources that get this view. */
  sources: string[];
  zoneView: View;
}

/** Starts unbound with the current zone and keeps it current; resolves once it answers (addresses in use are retried). */
export async function startUnboundDns(opts: UnboundDnsOptions): Promise<RunningDns> {
  const binary = opts.unboundBinary ?? unboundBinary;
  if (!existsSync(binary)) {
    throw new TarmacError('failed_precondition', `dns.engine "unbound" needs ${binary} (apt-get install unbound), or set dns.engine = "node"`);
  }
  sourceList(opts.trusted); // throws invalid_argument for an entry that is not an address or range, as the Node engine does
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
  /** What unbound should hold, per view: kept current from the zone app by app (see `#refresh`). */
  #state = new Map<string, ViewState>();
  /** How long working out the last update took (main thread): catalog batches are gathered for five times that long. */
  #lastSyncMs = 0;
  #removedSinceLoad = 0;
  /** Every operation on unbound, one at a time. */
  #queue: Promise<void> = Promise.resolve();
  #dirty: NodeJS.Timeout | undefined;
  #timers = new Set<NodeJS.Timeout>();
  #backoffMs = 250;
  #restarting = false;
  #started = false;
  #reloadTimer: NodeJS.Timeout | undefined;
  #rebindTimer: NodeJS.Timeout | undefined;
  /** Listen addresses whose port this engine chose (asked on port 0). */
  readonly #picked = new Set<DnsListen>();
  #lastReload = 0;
  #lastReloadMs = 0;
  #closed = false;
  #recentLog: string[] = [];
  /** TXT lists too long to answer, logged once each. */
  readonly #warnedLong = new Set<string>();
  readonly #warnedTrusted = new Set<string>();
  #lastSkipLog = 0;
  #skippedSinceLog = 0;
  /** A name or record left out: TXT lists too long to answer logged once each, the rest at most every 10 s. */
  readonly #skip = (name: string, reason: 'too long' | 'unsafe'): void => {
    if (reason === 'too long') {
      if (this.#warnedLong.has(name) || this.#warnedLong.size > 1000) return;
      this.#warnedLong.add(name);
      this.#opts.log.warn({ name, max: maxTxtList }, 'dns TXT list too long for a DNS message, not served');
      return;
    }
    this.#skippedSinceLog++;
    const now = Date.now();
    if (now - this.#lastSkipLog < 10_000) return;
    this.#lastSkipLog = now;
    // The name only when it is printable: it comes from the catalog.
    this.#opts.log.warn({ name: /^[\x20-\x7e]{1,300}$/.test(name) ? name : undefined, count: this.#skippedSinceLog },
      'dns names or records unbound cannot hold left out (characters or lengths outside what it accepts)');
    this.#skippedSinceLog = 0;
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
    // Only this process (root) reads the config and speaks to the control socket, which takes commands unauthenticated.
    await mkdir(this.#opts.stateDir, { recursive: true, mode: 0o700 });
    await chmod(this.#opts.stateDir, 0o700);
    await this.#killStale();
    for (let attempt = 1; ; attempt++) {
      this.#listen = [];
      this.#deferred = [];
      for (const l of this.#opts.listen) {
        if (l.port === 0) this.#listen.push(await this.#pick(l.host)); // free just now (taken meanwhile: the launch fails, picked again)
        else if ((await probeListen(l)) === 'in-use') this.#deferred.push({ ...l });
        else this.#listen.push({ ...l });
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
    if (this.#deferred.length > 0) this.#scheduleRebind();
  }

  /** A free port on `host` for a listener asked on port 0 (chosen again, rather than waited for, if someone takes it). */
  async #pick(host: string): Promise<DnsListen> {
    const l = { host, port: await freePort(host) };
    this.#picked.add(l);
    return l;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#unsubscribe();
    if (this.#dirty) clearTimeout(this.#dirty);
    if (this.#reloadTimer) clearTimeout(this.#reloadTimer);
    if (this.#rebindTimer) clearTimeout(this.#rebindTimer);
    for (const t of this.#timers) clearTimeout(t);
    const child = this.#child;
    if (child) await stopChild(child);
    await this.#queue.catch(() => {});
    // A launch that was under way has stopped its own unbound; this catches one that got further than that.
    const late = this.#child;
    if (late) await stopChild(late);
    this.#child = undefined;
    this.#bound = [];
  }

  // ---- the process

  /** Writes the config with every record, starts unbound and waits until it answers its control socket. */
  async #launch(): Promise<void> {
    if (this.#closed) return;
    if (this.#listen.length === 0) return; // every address in use: started once one is free (unbound would take localhost:53)
    const { views } = this.#refresh();
    const data = this.#dataOf(views);
    await this.#writeConfig(views, data);
    await this.#opts.testHooks?.beforeSpawn?.();
    if (this.#closed) throw new TarmacError('unavailable', 'dns server closed while starting unbound');
    const listen = [...this.#listen];
    const binary = this.#opts.unboundBinary ?? unboundBinary;
    this.#recentLog = [];
    const { child, exited } = spawnTied(binary, ['-d', '-c', this.#conf], (line) => this.#onLog(line));
    this.#child = child;
    void exited.then((how) => this.#onExit(child, how));
    let gone: string | undefined;
    void exited.then((how) => { gone = how; });
    try {
      await this.#waitControl(child);
    } catch (e) {
      await stopChild(child); // closed meanwhile, or no answer in time: this unbound must not outlive the failure
      if (this.#child === child) this.#child = undefined;
      if (this.#closed) throw new TarmacError('unavailable', 'dns server closed while starting unbound');
      if (gone === undefined) throw new TarmacError('unavailable', `unbound did not answer on its control socket within ${readyTimeoutMs} ms`, { cause: e });
      throw new TarmacError('unavailable', `unbound did not start (${gone}): ${this.#recentLog.slice(-3).join(' | ') || 'no output'}. `
        + `If AppArmor confines unbound, allow its state dir in /etc/apparmor.d/local/usr.sbin.unbound ("${this.#opts.stateDir}/** rw,") `
        + 'and reload the profile (apparmor_parser -r /etc/apparmor.d/usr.sbin.unbound), or set dns.engine = "node"');
    }
    this.#loaded = cloneData(data);
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
      }).catch((e: unknown) => { if (!this.#closed) this.#opts.log.error({ err: e }, 'unbound restart failed'); }).finally(() => {
        this.#restarting = false;
        if (!this.#child && !this.#closed && this.#listen.length > 0) this.#restartLater();
      });
    });
  }

  /** Before a restart: addresses someone else took meanwhile wait in the background; a port chosen for port 0 is chosen again. */
  async #reprobe(): Promise<void> {
    const keep: DnsListen[] = [];
    for (const l of this.#listen) {
      if ((await probeListen(l)) !== 'in-use') keep.push(l);
      else if (this.#picked.has(l)) {
        this.#picked.delete(l);
        const again = await this.#pick(l.host);
        this.#opts.log.warn({ host: l.host, port: again.port, was: l.port }, 'dns listener port taken by someone else, listening on another');
        keep.push(again);
      } else {
        this.#deferred.push(l);
        this.#opts.log.warn({ host: l.host, port: l.port, code: 'EADDRINUSE' }, 'dns listener unavailable, retrying in the background');
        this.#scheduleRebind();
      }
    }
    this.#listen = keep;
  }

  /** One pending retry of the addresses in use at a time. */
  #scheduleRebind(): void {
    if (this.#rebindTimer || this.#closed) return;
    this.#rebindTimer = setTimeout(() => {
      this.#rebindTimer = undefined;
      if (!this.#closed) this.#retryDeferred();
    }, rebindMs);
    this.#rebindTimer.unref();
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
    }).catch((e: unknown) => { if (!this.#closed) this.#opts.log.error({ err: e }, 'dns listener retry failed'); }).finally(() => {
      if (this.#deferred.length > 0) this.#scheduleRebind();
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
    if (!cmdline.split('\0').includes(this.#conf)) return; // exactly our config, not one whose path starts like it
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
        if (this.#closed) return; // closing stopped it: nothing to log or retry
        // unbound may now hold part of the change: the next try reloads everything.
        this.#opts.log.error({ err: e }, 'dns update failed, retrying with a reload');
        this.#loadedViews = '';
        this.#later(1000, () => this.#schedule());
      });
    }, Math.min(maxDebounceMs, Math.max(debounceMs, 5 * this.#lastSyncMs)));
  }

  /**
   * Brings unbound to the zone: the changed names over the control socket. A config reload instead when the views
   * changed (an org came or went) or after many removals (compaction). A record still too long for the control socket
   * (long TXT lists are split, so only a pathological one) waits for a rate-limited reload; the other names change at once.
   */
  async #sync(): Promise<void> {
    if (!this.#child || this.#closed) return; // a (re)start loads everything anyway
    const started = performance.now();
    const { views, touched } = this.#refresh();
    const viewsChanged = viewsKey(views) !== this.#loadedViews;
    const data = this.#dataOf(views);
    const plan = viewsChanged ? undefined : diff(this.#loaded, data, touched);
    this.#lastSyncMs = performance.now() - started; // this process's own work (the debounce grows with it)
    if (!plan || this.#removedSinceLoad + plan.removedBytes > compactAfterRemovedBytes) {
      await this.#reload(views, plan ? 'compaction' : 'views changed');
      return;
    }
    // New names and grown record sets first (nothing gets worse), then per view the removals and re-adds back to back
    // (two commands on the socket: a query can fall between them, for well under a millisecond).
    let commands = 0;
    const send = async (args: string[], items: string[]) => {
      // At most 64 KiB per command: unbound reads a command's lines with the whole server waiting, so each one must
      // fit the socket buffer at once rather than trickle in as this process gets to write it.
      for (const chunk of chunks(items, 64 << 10)) {
        const reply = await control(this.#ctl, args, chunk.join('\n') + '\n');
        commands++;
        // unbound says how many lines it took: fewer means part of the change is missing (the caller reloads then).
        const took = /^(?:added|removed) (\d+) datas$/m.exec(reply)?.[1];
        if (took !== undefined && Number(took) !== chunk.length) {
          throw new Error(`unbound control ${args[0]}: took ${took} of ${chunk.length} lines`);
        }
      }
    };
    for (const [view, lines] of plan.add) await send(['view_local_datas', view], lines);
    for (const [view, names] of plan.remove) {
      await send(['view_local_datas_remove', view], names.map((n) => `${n}.`));
      const lines = plan.readd.get(view);
      if (lines && lines.length > 0) await send(['view_local_datas', view], lines);
    }
    const deferred = new Set(plan.deferred.map(([view, name]) => `${view}\0${name}`)); // unbound still has their old records
    for (const [view, names] of touched) {
      const loaded = this.#loaded.get(view)!;
      const want = data.get(view)!;
      for (const name of names) {
        if (deferred.has(`${view}\0${name}`)) continue;
        const lines = want.get(name);
        if (lines) loaded.set(name, lines);
        else loaded.delete(name);
      }
    }
    this.#removedSinceLoad += plan.removedBytes;
    this.#opts.log.debug({ ms: Math.round(performance.now() - started), commands, deferred: plan.deferred.length }, 'unbound updated');
    if (plan.deferred.length > 0) this.#reloadSoon();
  }

  async #reload(views: ViewSpec[], reason: string): Promise<void> {
    const started = Date.now();
    const data = this.#dataOf(views);
    await this.#writeConfig(views, data);
    const child = this.#child;
    await control(this.#ctl, ['reload']);
    await this.#opts.testHooks?.afterReloadSent?.(child?.pid);
    await this.#waitControl(child);
    this.#loaded = cloneData(data);
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
        await this.#reload(this.#refresh().views, 'long records');
      }).catch((e: unknown) => {
        if (this.#closed) return;
        this.#opts.log.error({ err: e }, 'dns reload failed, retrying');
        this.#loadedViews = '';
        this.#later(1000, () => this.#schedule());
      });
    }, wait);
    this.#reloadTimer.unref();
  }

  /**
   * Brings the views unbound should have and their records up to the zone, and says which names (per view) may have
   * changed. An app's names are compiled again only when its token changed (its machines or row), and the lists
   * (`_apps`, `_instances`) only when a view's apps or their tokens did: a change costs about its own app, not the fleet.
   */
  #refresh(): { views: ViewSpec[]; touched: Map<string, Set<string>> } {
    const region = this.#opts.region;
    const views: ViewSpec[] = [];
    // One view per network, for the org the Node engine gives it (a network number the address cannot hold has none).
    const orgs = this.#zone.orgs().filter((o) => Number.isInteger(o.network) && o.network >= 0 && o.network <= 0xffffffff
      && this.#zone.orgOfNetwork(o.network) === o.slug);
    const trusted = this.#trustedSources(new Set(orgs.map((o) => o.network)));
    if (trusted.length > 0) views.push({ name: 'trusted', sources: trusted, zoneView: { org: undefined, region } });
    for (const o of orgs) views.push({ name: `org-${o.network}`, sources: [networkCidr(o.network)], zoneView: { org: o.slug, region } });
    const touched = new Map<string, Set<string>>();
    const next = new Map<string, ViewState>();
    for (const v of views) {
      let st = this.#state.get(v.name);
      if (!st || st.spec.zoneView.org !== v.zoneView.org) st = { spec: v, apps: new Map(), lists: undefined, data: new Map() };
      st.spec = v;
      next.set(v.name, st);
      const changed = new Set<string>();
      touched.set(v.name, changed);
      const state = st;
      const replace = (old: ViewData | undefined, now: ViewData | undefined) => {
        if (old) for (const name of old.keys()) if (!now?.has(name)) { state.data.delete(name); changed.add(name); }
        if (now) for (const [name, lines] of now) if (old?.get(name) !== lines) { state.data.set(name, lines); changed.add(name); }
      };
      const apps = this.#zone.appNames(v.zoneView);
      const tokens = apps.map((a) => this.#zone.appToken(a));
      if (st.apps.size > apps.length || apps.some((a) => !state.apps.has(a))) {
        const current = new Set(apps);
        for (const [app, hit] of st.apps) {
          if (current.has(app)) continue;
          replace(hit.data, undefined);
          st.apps.delete(app);
        }
      }
      for (let i = 0; i < apps.length; i++) {
        const app = apps[i]!;
        const hit = st.apps.get(app);
        if (hit?.token === tokens[i]) continue;
        const data = compile(this.#zone.appRecords(v.zoneView, app, topCap), this.#skip);
        for (const name of listNames) data.delete(name); // the lists' own names (an app named _apps) stay the lists'
        replace(hit?.data, data);
        st.apps.set(app, { token: tokens[i]!, data });
      }
      const lists = st.lists;
      if (!lists || lists.apps.length !== apps.length || lists.apps.some((a, i) => a !== apps[i] || lists.tokens[i] !== tokens[i])) {
        const data = compile(this.#zone.listRecords(v.zoneView), this.#skip);
        replace(lists?.data, data);
        st.lists = { apps, tokens, data };
      }
    }
    this.#state = next;
    return { views, touched };
  }

  /** Every view's records, as `#refresh` left them. */
  #dataOf(views: ViewSpec[]): Map<string, ViewData> {
    return new Map(views.map((v) => [v.name, this.#state.get(v.name)!.data]));
  }

  /**
   * `dns.trusted` without the entries that lie inside a known org's /48 (the whole /48, a narrower range, one address):
   * unbound picks the view by longest prefix (the trusted view winning ties), so such an entry would show that org's
   * machines every org's names. The Node engine checks the org first; this keeps unbound the same. Recomputed with
   * the views (an org created later drops an entry then), each dropped entry logged once.
   */
  #trustedSources(networks: Set<number>): string[] {
    return this.#opts.trusted.filter((source) => {
      const network = privateNetworkOfRange(source);
      if (network === undefined || !networks.has(network)) return true;
      const key = `${source}\0${network}`;
      if (!this.#warnedTrusted.has(key)) {
        this.#warnedTrusted.add(key);
        this.#opts.log.warn({ source, network }, 'dns.trusted entry inside an organization\'s network ignored: its machines see only their organization\'s names');
      }
      return false;
    });
  }

  async #writeConfig(views: ViewSpec[], data: Map<string, ViewData>): Promise<void> {
    const text = unboundConfig({
      stateDir: this.#opts.stateDir, ctl: this.#ctl, pidFile: this.#pidFile, listen: this.#listen, views, data,
      forwardTimeoutMs: this.#opts.forwardTimeoutMs,
      upstreams: this.#opts.upstreams.filter((u) => !this.#opts.listen.some((l) => l.host === u.host && l.port === u.port)
        && !this.#listen.some((l) => l.host === u.host && l.port === u.port)), // never forward to ourselves
    });
    await writeFile(`${this.#conf}.tmp`, text, { mode: 0o600 });
    await chmod(`${this.#conf}.tmp`, 0o600); // an older file of a crashed run keeps its mode otherwise
    await rename(`${this.#conf}.tmp`, this.#conf);
  }

  /**
   * Waits for unbound's control socket to answer (after a start or a reload). Gives up at once when that unbound exited
   * or was replaced, or the engine closed: a restart (queued behind) must not wait out the timeout.
   */
  async #waitControl(child: ChildProcess | undefined): Promise<void> {
    const deadline = Date.now() + readyTimeoutMs;
    for (;;) {
      if (this.#closed) throw new TarmacError('unavailable', 'dns server closed while waiting for unbound');
      if (!child || this.#child !== child || child.exitCode !== null || child.signalCode !== null) {
        throw new TarmacError('unavailable', 'unbound exited before it answered on its control socket');
      }
      try {
        await control(this.#ctl, ['status']);
        return;
      } catch (e) {
        if (Date.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }

  #enqueue(op: () => Promise<void>): Promise<void> {
    const run = this.#queue.then(op);
    this.#queue = run.catch(() => {});
    return run;
  }

  #later(ms: number, fn: () => void): void {
    if (this.#closed) return;
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
/**
 * One character of a TXT character-string in presentation form: `"` and `\` escaped; `'` (it quotes config lines) and
 * anything else outside printable ASCII as \DDD per UTF-8 byte.
 */
const escapeChar = (c: string) => (c === '"' || c === '\\' ? `\\${c}`
  : /^[\x20-\x7e]$/.test(c) && c !== "'" ? c : [...Buffer.from(c, 'utf8')].map((b) => `\\${String(b).padStart(3, '0')}`).join(''));
const escapeText = (s: string) => s.replace(/[\\"']|[^\x20-\x7e]/gu, escapeChar);

/** Text of a TXT record as quoted, escaped DNS character-strings of at most 255 bytes each, as the Node engine splits it. */
const txtStrings = (text: string): string[] => txtChunks(text).map((c) => `"${escapeText(c)}"`);

/** Text per TXT record: one record, unless its escaped form would not fit a control-socket line (see `txtRecordMax`). */
function txtParts(name: string, text: string): string[] {
  const plain = /^[\x20-\x21\x23-\x26\x28-\x5b\x5d-\x7e]*$/.test(text); // nothing to escape: lengths as they are
  const escaped = (s: string) => (plain ? s.length : escapeText(s).length);
  if (escaped(text) <= txtRecordMax) return [text];
  const sep = name === `_instances.${zoneName}` ? ';' : ',';
  const parts: string[] = [];
  let current = '';
  let size = 0;
  for (const entry of text.split(sep)) {
    const n = escaped(entry);
    if (current !== '' && size + 1 + n > txtRecordMax) {
      parts.push(`${current}${sep}`);
      current = entry;
      size = n;
    } else {
      current = current === '' ? entry : `${current}${sep}${entry}`;
      size += (size === 0 ? 0 : 1) + n;
    }
  }
  parts.push(current);
  return parts;
}

/** The longest local-data line written: far below what a DNS record holds (65535 bytes of data). */
const maxLine = 16_384;
const txtString = String.raw`"(?:[\x20\x21\x23-\x26\x28-\x5b\x5d-\x7e]|\\[\\"]|\\(?:[01]\d\d|2[0-4]\d|25[0-5]))*"`;
const rrShape = new RegExp(String.raw`^[a-z0-9_.-]{1,254}\. \d+ IN (?:AAAA [0-9a-f:.]{2,45}|TXT ${txtString}(?: ${txtString})*|TYPE65280 \\# 0)$`);

/**
 * Whether unbound accepts `line` as local data: the shapes this file writes, printable ASCII only (no `'`, which quotes
 * config lines), character-strings of at most 255 bytes, a bounded length. Catalog data (app names,
 * regions, metadata) reach these lines; one unbound rejects would stop it reading its config, so anything else is left out.
 */
export function localDataOk(line: string): boolean {
  if (line.length > maxLine || !rrShape.test(line)) return false;
  if (line.includes(' IN AAAA ')) return isIP(line.slice(line.lastIndexOf(' ') + 1)) === 6;
  if (line.includes(' IN TXT ')) {
    for (const m of line.slice(line.indexOf(' IN TXT ') + 8).matchAll(/"((?:[^"\\]|\\.)*)"/g)) {
      if (m[1]!.replace(/\\\d{3}|\\./g, '.').length > 255) return false; // bytes: an escape stands for one
    }
  }
  return true;
}

/** The zone's records of one view as local-data lines; names and records unbound cannot hold (odd characters, lengths) are left out. */
function compile(r: PrecompiledNames, skip: (name: string, reason: 'too long' | 'unsafe') => void): ViewData {
  const out: ViewData = new Map();
  for (const [name, answers] of r.records) {
    if (!nameOk(name)) {
      skip(name, 'unsafe');
      continue;
    }
    const lines: string[] = [];
    for (const a of answers) {
      if (a.type === 'AAAA') lines.push(`${name}. ${internalTtl} IN AAAA ${String(a.data).toLowerCase()}`);
      else if (a.type === 'TXT') {
        const text = (Array.isArray(a.data) ? a.data : [a.data]).map((c) => c.toString()).join('');
        if (text.length > maxTxtList) {
          skip(name, 'too long');
          continue;
        }
        for (const part of txtParts(name, text)) lines.push(`${name}. ${internalTtl} IN TXT ${txtStrings(part).join(' ')}`);
      }
    }
    const safe = lines.filter((l) => localDataOk(l));
    if (safe.length < lines.length) skip(name, 'unsafe');
    if (safe.length > 0) out.set(name, safe);
  }
  // A name that exists without records (an app with no started machine, its vms/regions/vm/process names): a
  // placeholder record one label below makes it exist, so it answers NODATA rather than NXDOMAIN, as in the zone.
  for (const name of r.empty) {
    if (nameOk(`_.${name}`)) out.set(`_.${name}`, [`_.${name}. ${internalTtl} IN ${placeholderType} \\# 0`]);
    else skip(name, 'unsafe');
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
function diff(from: Map<string, ViewData>, to: Map<string, ViewData>, touched: Map<string, Set<string>>): Plan {
  const plan: Plan = { add: new Map(), remove: new Map(), readd: new Map(), removedBytes: 0, deferred: [] };
  const push = (m: Map<string, string[]>, view: string, items: string[]) => {
    if (items.length === 0) return;
    const list = m.get(view);
    if (list) list.push(...items);
    else m.set(view, [...items]);
  };
  for (const [view, names] of touched) {
    const want = to.get(view) ?? new Map<string, string[]>();
    const have = from.get(view) ?? new Map<string, string[]>();
    for (const name of names) {
      const old = have.get(name);
      const lines = want.get(name);
      if (!lines) {
        if (old) {
          push(plan.remove, view, [name]);
          plan.removedBytes += old.reduce((n, l) => n + l.length, 0);
        }
        continue;
      }
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

/** A copy of every view's map (the record arrays shared: they are never changed once made). */
function cloneData(data: Map<string, ViewData>): Map<string, ViewData> {
  return new Map([...data].map(([view, names]) => [view, new Map(names)]));
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
  lines.push('remote-control:', '  control-enable: yes', `  control-interface: ${q(o.ctl)}`, '  control-use-cert: no', '');
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
