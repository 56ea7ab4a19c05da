// The HAProxy data plane: HAProxy takes the proxy's HTTP port and serves the apps it can serve exactly as Tarmac's proxy
// would (by Host, least loaded, hard limits with a queue, Fly's headers); every other request goes on to the Node proxy.
import { randomBytes } from 'node:crypto';
import { subscribe, unsubscribe as unsubscribeChannel } from 'node:diagnostics_channel';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, rename, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import type { CatalogReader } from '../../catalog/index.ts';
import { errorMessage } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';
import { autostartable } from '../autostart.ts';
import { autostopEnabled } from '../autostop.ts';
import { proxyDefaults, proxyRequestChannel, startProxy, type ProxyOptions, type ProxyRequestEvent, type RunningProxy } from '../proxy.ts';
import type { Backend, RoutingTable } from '../routing.ts';
import { address, appBackend, configurable, haproxyConfig, nodeBackend, serverMaxconn, serverName, type FastApp } from './config.ts';
import { haproxyLogSections, haproxyLogTarget, HaproxyEventReceiver } from './events.ts';
import { HaproxyProcess } from './process.ts';

export interface HaproxyPlaneOptions extends ProxyOptions {
  /** The proxy's catalog, with the machines (autostart and autostop keep an app on the Node proxy). */
  catalog: ProxyOptions['catalog'] & Pick<CatalogReader, 'listMachines'>;
  /** Where the config, the host map and HAProxy's sockets live (e.g. `<data_dir>/haproxy`). */
  stateDir: string;
  /** HAProxy threads; default one per core. */
  threads?: number;
  /** The haproxy binary (default /usr/sbin/haproxy). */
  binary?: string;
}

/** Catalog batches within this many ms are applied together (a burst of writes in one tick, say). */
const debounceMs = 1;
/** How often a machine taken out of HAProxy with requests still in flight is tried for deletion again. */
const drainRetryMs = 1_000;

/** A server as HAProxy has it. */
interface LoadedServer { readonly address: string; readonly port: number; readonly maxconn: number }

function serverOf(b: Backend): LoadedServer {
  return { address: b.address, port: b.port, maxconn: serverMaxconn(b) };
}

/** Backend → server → what HAProxy should have for `apps`. */
function serversOf(apps: readonly FastApp[]): Map<string, Map<string, LoadedServer>> {
  return new Map(apps.map((a) => [appBackend(a.app), new Map(a.backends.map((b) => [serverName(b), serverOf(b)]))]));
}

/** Client connections HAProxy may hold: about as many as this process may open files (its children inherit the limit). */
function maxConnections(): number {
  const limits = existsSync('/proc/self/limits') ? readFileSync('/proc/self/limits', 'utf8') : '';
  const hard = /^Max open files\s+\S+\s+(\d+)/m.exec(limits)?.[1];
  return Math.max(1_000, (hard === undefined ? 4_096 : Number(hard)) - 256);
}

/**
 * The user HAProxy's workers run as when Tarmac runs as root: Debian's `haproxy` (made by its package), else `nobody`.
 */
function workerUser(): { user: string; group: string } | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const passwd = existsSync('/etc/passwd') ? readFileSync('/etc/passwd', 'utf8') : '';
  return /^haproxy:/m.test(passwd) ? { user: 'haproxy', group: 'haproxy' } : { user: 'nobody', group: 'nogroup' };
}

/** Runtime API answers of commands that went through. */
function quiet(answer: string): boolean {
  return answer === '' || /^(no need to change|IP changed|port changed)/i.test(answer);
}

/** True when HAProxy's running map sends exactly the host names of `apps` to their backends (replays aside). */
function sameMap(mapped: ReadonlyMap<string, string>, apps: readonly FastApp[]): boolean {
  let count = 0;
  for (const a of apps) {
    for (const h of a.hosts) {
      if (mapped.get(h) !== appBackend(a.app)) return false;
      count++;
    }
  }
  for (const be of mapped.values()) if (be === nodeBackend) count++;
  return count === mapped.size;
}

/**
 * Starts Tarmac's Node proxy on a loopback port and HAProxy on the proxy's HTTP address in front of it. An app is
 * served by HAProxy itself while every machine that serves it runs on this host and speaks HTTP/1.1, and it has no
 * autostart candidate, no autostop and has not asked for a replay (fly-replay); its requests that ask for a machine or
 * a region (Fly-Force-Instance-Id, Fly-Prefer-Region) still go to the Node proxy, as does everything else.
 */
export async function startHaproxyPlane(opts: HaproxyPlaneOptions): Promise<RunningProxy> {
  const log = opts.log.child({ component: 'haproxy' });
  await mkdir(opts.stateDir, { recursive: true, mode: 0o700 });
  const port = opts.http.port !== 0 ? opts.http.port : await freePort(opts.http.host);
  const frontKey = randomBytes(24).toString('base64url');
  const events = await HaproxyEventReceiver.start({ log, key: randomBytes(12).toString('base64url') });
  let node: RunningProxy | undefined;
  try {
    node = await startProxy({ ...opts, http: { host: '127.0.0.1', port: 0 }, front: { key: frontKey, port } });
    const plane = new Plane(opts, log, node, events, frontKey, { host: opts.http.host, port });
    await plane.start();
    return plane;
  } catch (err) {
    await node?.close();
    await events.close();
    throw err;
  }
}

class Plane implements RunningProxy {
  readonly #o: HaproxyPlaneOptions;
  readonly #log: Logger;
  readonly #node: RunningProxy;
  readonly #events: HaproxyEventReceiver;
  readonly #frontKey: string;
  readonly #address: { host: string; port: number };
  readonly #configPath: string;
  readonly #hostsMap: string;
  readonly #adminSocket: string;
  readonly #suffix: string;
  readonly #runAs = workerUser();
  /** Apps that asked for a replay: the Node proxy serves them from then on. */
  readonly #replaying = new Set<string>();
  #haproxy: HaproxyProcess | undefined;
  #unsubscribe: (() => void) | undefined;
  #timer: NodeJS.Timeout | undefined;
  /** The config text last written (HAProxy runs it, with runtime changes when only machines changed). */
  #applied = '';
  #appliedMap = '';
  /** The apps of that config, and their names. */
  #written: readonly FastApp[] = [];
  #fast = new Set<string>();
  /** Backend → server → what the running HAProxy has (loaded, then changed through the runtime API). */
  #servers = new Map<string, Map<string, LoadedServer>>();
  #routes: RoutingTable;
  /** `backend/server` put in maintenance, deleted once their requests are done. */
  readonly #draining = new Set<string>();
  #syncing: Promise<void> = Promise.resolve();
  /** Syncs failed in a row (the retry backs off with them), and the retry's timer. */
  #failures = 0;
  #retry: NodeJS.Timeout | undefined;
  #closed: Promise<void> | undefined;

  constructor(o: HaproxyPlaneOptions, log: Logger, node: RunningProxy, events: HaproxyEventReceiver, frontKey: string, address: { host: string; port: number }) {
    this.#o = o;
    this.#log = log;
    this.#node = node;
    this.#events = events;
    this.#frontKey = frontKey;
    this.#address = address;
    this.#routes = node.routes;
    this.#configPath = join(o.stateDir, 'haproxy.cfg');
    this.#hostsMap = join(o.stateDir, 'hosts.map');
    this.#adminSocket = join(o.stateDir, 'admin.sock');
    this.#suffix = `.${(o.appsDomain ?? 'localhost').toLowerCase().replace(/^\.+|\.+$/g, '')}`;
  }

  get address(): { host: string; port: number } {
    return this.#address;
  }

  get backhaulAddress(): { host: string; port: number } | undefined {
    return this.#node.backhaulAddress;
  }

  get httpsAddress(): { host: string; port: number } | undefined {
    return this.#node.httpsAddress;
  }

  /** The routing table HAProxy was last brought to (the Node proxy's own is a moment ahead of it). */
  get routes(): RoutingTable {
    return this.#routes;
  }

  async start(): Promise<void> {
    const apps = this.#fastApps(this.#routes);
    await this.#write(this.#render(apps), apps);
    this.#loaded(apps);
    this.#haproxy = await HaproxyProcess.start({
      configPath: this.#configPath, stateDir: this.#o.stateDir, adminSocket: this.#adminSocket, log: this.#log,
      ...(this.#o.binary === undefined ? {} : { binary: this.#o.binary }),
      onRestart: () => {
        // A restarted HAProxy read the last config written: noted in turn with syncs, then brought up to date.
        this.#syncing = this.#syncing.then(() => this.#loaded(this.#written));
        this.#schedule();
      },
    });
    const unsubscribe = this.#o.catalog.subscribe(() => this.#schedule());
    // A replay HAProxy turned into a 307 changed its host map: read it while HAProxy still has it (the next reload
    // would otherwise bring the app back).
    const onRequest = (m: unknown) => {
      const e = m as ProxyRequestEvent;
      if (e.status === 307 && e.app !== undefined && this.#fast.has(e.app)) this.#schedule();
    };
    subscribe(proxyRequestChannel, onRequest);
    this.#unsubscribe = () => {
      unsubscribe();
      unsubscribeChannel(proxyRequestChannel, onRequest);
    };
    this.#schedule(); // what changed while HAProxy started
    this.#log.info({ address: this.#address, node: this.#node.address }, 'HAProxy data plane listening');
  }

  /** Syncs HAProxy with the routing table soon (batches close together make one reload). */
  #schedule(): void {
    if (this.#closed !== undefined || this.#timer !== undefined) return;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#syncing = this.#syncing.then(() => this.#sync());
    }, debounceMs);
  }

  /**
   * Reads HAProxy's host map (replays), then brings HAProxy to the routing table through its runtime API: servers
   * added, changed and drained (queued requests take a machine that starts, in-flight counts stay), host names mapped
   * and unmapped. Only an app whose backend the running HAProxy does not have yet takes a reload.
   */
  async #sync(): Promise<void> {
    const haproxy = this.#haproxy;
    if (haproxy === undefined || this.#closed !== undefined) return;
    const table = this.#node.routes;
    try {
      const mapped = await this.#readMap(haproxy);
      const apps = this.#fastApps(table);
      const config = this.#render(apps);
      if (config.config === this.#applied && this.#draining.size === 0 && sameMap(mapped, apps)) {
        this.#synced(table);
        return;
      }
      if (apps.every((a) => this.#servers.has(appBackend(a.app)))) {
        try {
          await this.#update(haproxy, apps, mapped);
          if (config.config !== this.#applied || config.hostsMap !== this.#appliedMap) await this.#write(config, apps);
          this.#synced(table);
          return;
        } catch (err) {
          this.#log.warn({ err: errorMessage(err) }, 'HAProxy\'s runtime API refused a change: reloading it instead');
        }
      }
      const previous = { config: this.#applied, hostsMap: this.#appliedMap, apps: this.#written };
      await this.#write(config, apps);
      try {
        await haproxy.reload();
      } catch (err) {
        // The files go back to what HAProxy runs (a restart must not load what it refused); the next change tries again.
        await this.#write({ config: previous.config, hostsMap: previous.hostsMap }, previous.apps);
        throw err;
      }
      this.#loaded(apps);
      this.#synced(table);
    } catch (err) {
      this.#failures++;
      const retryMs = Math.min(30_000, 100 * 2 ** this.#failures);
      this.#log.error({ err: errorMessage(err), retryMs }, 'HAProxy could not take the new routing table; it keeps the last one');
      this.#retryLater(retryMs);
    }
  }

  /** HAProxy was brought to `table`. */
  #synced(table: RoutingTable): void {
    this.#routes = table;
    this.#failures = 0;
  }

  /** Syncs again in `ms` (a failed sync, machines still draining); one timer at a time, none after close. */
  #retryLater(ms: number): void {
    if (this.#retry !== undefined || this.#closed !== undefined) return;
    this.#retry = setTimeout(() => {
      this.#retry = undefined;
      this.#schedule();
    }, ms);
    this.#retry.unref();
  }

  /** HAProxy runs the config written for `apps` (it was just (re)loaded): the backends and servers it has. */
  #loaded(apps: readonly FastApp[]): void {
    this.#servers = serversOf(apps);
    this.#draining.clear();
  }

  /**
   * Brings the running HAProxy to `apps` when it has every one's backend: host names of apps it no longer serves
   * unmapped first (the Node proxy takes them at once), servers added, changed and drained (a server taken out is put
   * in maintenance, its requests in flight finish, and it is deleted once it has none), new host names mapped last.
   */
  async #update(haproxy: HaproxyProcess, apps: readonly FastApp[], mapped: ReadonlyMap<string, string>): Promise<void> {
    const run = async (command: string, ok: (answer: string) => boolean = quiet) => {
      const answer = (await haproxy.command(command)).trim();
      if (!ok(answer)) throw new Error(`${command}: ${answer}`);
    };
    const wantMap = new Map(apps.flatMap((a) => a.hosts.map((h) => [h, appBackend(a.app)] as const)));
    for (const [host, be] of mapped) {
      if (!wantMap.has(host) && be !== nodeBackend) await run(`del map ${this.#hostsMap} ${host}`);
    }
    const wantServers = serversOf(apps);
    for (const [be, have] of this.#servers) {
      const want = wantServers.get(be) ?? new Map<string, LoadedServer>();
      for (const [name, w] of want) {
        const h = have.get(name);
        const id = `${be}/${name}`;
        if (h === undefined) {
          await run(`add server ${id} ${address(w.address, w.port)} maxconn ${w.maxconn}`, (a) => /registered/i.test(a));
          have.set(name, w);
        } else {
          if (h.address !== w.address || h.port !== w.port) await run(`set server ${id} addr ${w.address} port ${w.port}`);
          if (h.maxconn !== w.maxconn) await run(`set maxconn server ${id} ${w.maxconn}`);
          have.set(name, w);
          if (!this.#draining.delete(id)) continue;
        }
        await run(`enable server ${id}`);
      }
      for (const name of have.keys()) {
        const id = `${be}/${name}`;
        if (want.has(name) || this.#draining.has(id)) continue;
        await run(`disable server ${id}`);
        this.#draining.add(id);
      }
    }
    for (const id of this.#draining) {
      const answer = (await haproxy.command(`del server ${id}`)).trim();
      if (/^Server still has connections/.test(answer)) continue; // requests in flight: tried again later
      if (!/^(Server deleted|No such server)/.test(answer)) throw new Error(`del server ${id}: ${answer}`);
      this.#draining.delete(id);
      const [be, name] = id.split('/') as [string, string];
      this.#servers.get(be)?.delete(name);
    }
    if (this.#draining.size > 0) this.#retryLater(drainRetryMs);
    for (const [host, be] of wantMap) {
      if (mapped.get(host) === be) continue;
      await run(mapped.has(host) ? `set map ${this.#hostsMap} ${host} ${be}` : `add map ${this.#hostsMap} ${host} ${be}`);
    }
  }

  /**
   * HAProxy's host map as it runs (host → backend). An app whose host a replay handed to the Node proxy is noted,
   * so every later config does the same.
   */
  async #readMap(haproxy: HaproxyProcess): Promise<Map<string, string>> {
    const mapped = new Map<string, string>();
    for (const line of (await haproxy.command(`show map ${this.#hostsMap}`)).split('\n')) {
      const [, host, backend] = line.trim().split(/\s+/);
      if (host === undefined || backend === undefined) continue;
      mapped.set(host, backend);
      if (backend !== nodeBackend || !host.endsWith(this.#suffix)) continue;
      const app = host.slice(0, host.length - this.#suffix.length);
      if (!this.#replaying.has(app)) {
        this.#replaying.add(app);
        this.#log.info({ app }, 'app asked for a replay (fly-replay): the Node proxy serves it from now on');
      }
    }
    return mapped;
  }

  #render(apps: readonly FastApp[]): { config: string; hostsMap: string } {
    const t = { ...proxyDefaults.timeouts, ...this.#o.timeouts };
    const limits = { ...proxyDefaults.limits, ...this.#o.limits };
    return haproxyConfig({
      listen: this.#address, adminSocket: this.#adminSocket, hostsMap: this.#hostsMap, node: this.#node.address,
      frontKey: this.#frontKey, region: this.#o.region ?? 'local', threads: this.#o.threads ?? Math.min(64, availableParallelism()), // HAProxy 2.6 takes at most 64
      timeouts: t, maxconn: maxConnections(), maxHeaders: limits.maxHeaders, queuePerApp: limits.queuePerApp, log: { target: haproxyLogTarget(), format: this.#events.logFormat, sections: haproxyLogSections(this.#events.port) },
      apps,
      // Workers that parse clients' requests hold no root powers (the ports are bound before they start).
      ...(this.#runAs === undefined ? {} : { runAs: this.#runAs }),
    });
  }

  /** The apps HAProxy serves itself (see startHaproxyPlane). */
  #fastApps(table: RoutingTable): FastApp[] {
    const slow = new Set(this.#replaying);
    for (const { spec, status } of this.#o.catalog.listMachines()) {
      if (slow.has(spec.app)) continue;
      if (autostopEnabled(spec.config) || (this.#o.autostart !== undefined && autostartable(spec, status))) slow.add(spec.app);
    }
    const out: FastApp[] = [];
    for (const route of table.apps.values()) {
      if (slow.has(route.app) || route.backends.length === 0) continue;
      if (route.backends.some((b) => b.via !== undefined || b.h2)) continue;
      // Two services of a machine on one internal port are one server.
      const backends = [...new Map(route.backends.map((b) => [serverName(b), b])).values()];
      const app: FastApp = { app: route.app, hosts: [`${route.app}${this.#suffix}`], backends };
      if (configurable(app)) out.push(app);
    }
    return out;
  }

  /** Writes the map, then the config (each replaced whole), the config readable by Tarmac only (it holds the front key). */
  async #write(c: { config: string; hostsMap: string }, apps: readonly FastApp[]): Promise<void> {
    await replaceFile(this.#hostsMap, c.hostsMap);
    await replaceFile(this.#configPath, c.config);
    this.#applied = c.config;
    this.#appliedMap = c.hostsMap;
    this.#written = apps;
    this.#fast = new Set(apps.map((a) => a.app));
  }

  close(): Promise<void> {
    return (this.#closed ??= this.#close());
  }

  async #close(): Promise<void> {
    this.#unsubscribe?.();
    clearTimeout(this.#timer);
    await this.#syncing;
    const drainMs = this.#o.timeouts?.drainMs ?? proxyDefaults.timeouts.drainMs;
    clearTimeout(this.#retry);
    try {
      await this.#haproxy?.close(drainMs);
    } finally {
      await this.#node.close();
      await this.#events.close();
    }
  }
}

async function replaceFile(path: string, text: string): Promise<void> {
  const tmp = `${path}.tmp`;
  await writeFile(tmp, text, { mode: 0o600 });
  await rename(tmp, path);
}

/** A port free on `host` now (HAProxy is told a fixed one). */
function freePort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, host, () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}
