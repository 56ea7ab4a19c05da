// The HAProxy data plane: HAProxy takes the proxy's HTTP port and serves the apps it can serve exactly as Tarmac's proxy
// would (by Host, least loaded, hard limits with a queue, Fly's headers); every other request goes on to the Node proxy.
import { randomBytes } from 'node:crypto';
import { subscribe, unsubscribe as unsubscribeChannel } from 'node:diagnostics_channel';
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
import type { RoutingTable } from '../routing.ts';
import { configurable, haproxyConfig, nodeBackend, type FastApp } from './config.ts';
import { haproxyLogFormat, haproxyLogSections, haproxyLogTarget, HaproxyEventReceiver } from './events.ts';
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

/** Catalog batches within this many ms are applied with one reload. */
const debounceMs = 20;

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
  const events = await HaproxyEventReceiver.start({ log });
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
  /** Apps that asked for a replay: the Node proxy serves them from then on. */
  readonly #replaying = new Set<string>();
  #haproxy: HaproxyProcess | undefined;
  #unsubscribe: (() => void) | undefined;
  #timer: NodeJS.Timeout | undefined;
  /** The config text HAProxy runs. */
  #applied = '';
  #syncing: Promise<void> = Promise.resolve();
  #closed: Promise<void> | undefined;

  constructor(o: HaproxyPlaneOptions, log: Logger, node: RunningProxy, events: HaproxyEventReceiver, frontKey: string, address: { host: string; port: number }) {
    this.#o = o;
    this.#log = log;
    this.#node = node;
    this.#events = events;
    this.#frontKey = frontKey;
    this.#address = address;
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

  get routes(): RoutingTable {
    return this.#node.routes;
  }

  async start(): Promise<void> {
    await this.#write(this.#render());
    this.#haproxy = await HaproxyProcess.start({
      configPath: this.#configPath, stateDir: this.#o.stateDir, adminSocket: this.#adminSocket, log: this.#log,
      ...(this.#o.binary === undefined ? {} : { binary: this.#o.binary }),
      onRestart: () => this.#schedule(),
    });
    const unsubscribe = this.#o.catalog.subscribe(() => this.#schedule());
    // A replay HAProxy turned into a 307 changed its host map: read it while HAProxy still has it (the next reload
    // would otherwise bring the app back).
    const onRequest = (m: unknown) => {
      if ((m as ProxyRequestEvent).status === 307) this.#schedule();
    };
    subscribe(proxyRequestChannel, onRequest);
    this.#unsubscribe = () => {
      unsubscribe();
      unsubscribeChannel(proxyRequestChannel, onRequest);
    };
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

  /** Reads which apps asked for replays (HAProxy's map), then reloads HAProxy if its config changed. */
  async #sync(): Promise<void> {
    const haproxy = this.#haproxy;
    if (haproxy === undefined || this.#closed !== undefined) return;
    try {
      await this.#readReplaying(haproxy);
      const config = this.#render();
      if (config.config === this.#applied) return;
      await this.#write(config);
      await haproxy.reload();
    } catch (err) {
      this.#log.error({ err: errorMessage(err) }, 'HAProxy could not take the new routing table; it keeps the last one');
    }
  }

  /** Apps HAProxy's map hands to the Node proxy since a replay: kept, so the next config does the same. */
  async #readReplaying(haproxy: HaproxyProcess): Promise<void> {
    const text = await haproxy.command(`show map ${this.#hostsMap}`);
    for (const line of text.split('\n')) {
      const [, host, backend] = line.trim().split(/\s+/);
      if (backend !== nodeBackend || host === undefined || !host.endsWith(this.#suffix)) continue;
      const app = host.slice(0, host.length - this.#suffix.length);
      if (!this.#replaying.has(app)) {
        this.#replaying.add(app);
        this.#log.info({ app }, 'app asked for a replay (fly-replay): the Node proxy serves it from now on');
      }
    }
  }

  #render(): { config: string; hostsMap: string } {
    const t = { ...proxyDefaults.timeouts, ...this.#o.timeouts };
    const limits = { ...proxyDefaults.limits, ...this.#o.limits };
    return haproxyConfig({
      listen: this.#address, adminSocket: this.#adminSocket, hostsMap: this.#hostsMap, node: this.#node.address,
      frontKey: this.#frontKey, region: this.#o.region ?? 'local', threads: this.#o.threads ?? availableParallelism(),
      timeouts: t, maxHeaders: limits.maxHeaders, log: { target: haproxyLogTarget(), format: haproxyLogFormat, sections: haproxyLogSections(this.#events.port) },
      apps: this.#fastApps(),
    });
  }

  /** The apps HAProxy serves itself (see startHaproxyPlane). */
  #fastApps(): FastApp[] {
    const slow = new Set(this.#replaying);
    for (const { spec, status } of this.#o.catalog.listMachines()) {
      if (slow.has(spec.app)) continue;
      if (autostopEnabled(spec.config) || (this.#o.autostart !== undefined && autostartable(spec, status))) slow.add(spec.app);
    }
    const out: FastApp[] = [];
    for (const route of this.#node.routes.apps.values()) {
      if (slow.has(route.app) || route.backends.length === 0) continue;
      if (route.backends.some((b) => b.via !== undefined || b.h2)) continue;
      const app: FastApp = { app: route.app, hosts: [`${route.app}${this.#suffix}`], backends: route.backends };
      if (configurable(app)) out.push(app);
    }
    return out;
  }

  /** Writes the map, then the config (each replaced whole), the config readable by Tarmac only (it holds the front key). */
  async #write(c: { config: string; hostsMap: string }): Promise<void> {
    await replaceFile(this.#hostsMap, c.hostsMap);
    await replaceFile(this.#configPath, c.config);
    this.#applied = c.config;
  }

  close(): Promise<void> {
    return (this.#closed ??= this.#close());
  }

  async #close(): Promise<void> {
    this.#unsubscribe?.();
    clearTimeout(this.#timer);
    await this.#syncing;
    const drainMs = this.#o.timeouts?.drainMs ?? proxyDefaults.timeouts.drainMs;
    await this.#haproxy?.close(drainMs);
    await this.#node.close();
    await this.#events.close();
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
