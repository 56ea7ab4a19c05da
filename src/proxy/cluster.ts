// The proxy on several cores: N node:cluster workers share the listening port, each holds its own routing table fed by the primary.
import cluster, { type Worker } from 'node:cluster';
import { fileURLToPath } from 'node:url';
import type { App, Certificate, ChangeBatch, Host, Machine } from '../catalog/index.ts';
import { TarmacError } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';
import type { ProxyLimits, ProxyOptions, ProxyTimeouts, RunningProxy } from './proxy.ts';
import { RouteIndex, type RoutingTable } from './routing.ts';

export interface ProxyClusterOptions extends ProxyOptions {
  /** Worker processes; each proxies on its own core. */
  workers: number;
  /** pino level for the workers' own loggers (they cannot share the primary's). Default 'info'. */
  logLevel?: string;
  /** Node flags for the workers. Default: `proxyWorkerHeapFlags` and tsx's loader, so the TypeScript sources load as in the host. */
  execArgv?: string[];
}

/** The proxy options a worker needs, sent with its first message. */
export interface WorkerProxyOptions {
  http: { host: string; port: number };
  appsDomain?: string;
  region?: string;
  hostId?: string;
  backhaul?: { host: string; port: number };
  https?: { host: string; port: number };
  certificatesDir?: string;
  timeouts?: ProxyTimeouts;
  limits?: ProxyLimits;
  logLevel: string;
}

/** Primary → worker. `init` carries a consistent catalog load; every batch after it follows on the same ordered channel. */
export type ToWorker =
  | { t: 'init'; options: WorkerProxyOptions; revision: number; apps: App[]; machines: Machine[]; hosts: Host[]; certificates: Certificate[] }
  | { t: 'batch'; batch: ChangeBatch }
  | { t: 'close' };

/** Worker → primary. */
export type FromWorker =
  | { t: 'ready' }
  | { t: 'listening'; host: string; port: number; backhaul?: { host: string; port: number }; https?: { host: string; port: number } }
  | { t: 'failed'; message: string };

/**
 * V8 heap flags for a process that proxies: every request allocates ~16 KB of short-lived objects (most of it in
 * node:http and undici), so a young generation of 32 MB semi-spaces (Node 20's default is 16 MB) halves the number of
 * scavenges and cuts their total time by about a third under load, for up to ~64 MB more memory per process when busy.
 */
export const proxyWorkerHeapFlags: readonly string[] = ['--max-semi-space-size=32'];

const workerFile = fileURLToPath(new URL('./cluster-worker.ts', import.meta.url));
const restartDelayMs = 1_000;

class ProxyCluster implements RunningProxy {
  readonly #opts: ProxyClusterOptions;
  readonly #log: Logger;
  readonly #index: RouteIndex;
  /** Workers that received `init`: they get every batch from then on. */
  readonly #fed = new Set<Worker>();
  readonly #workers = new Set<Worker>();
  readonly #unsubscribe: () => void;
  #address: { host: string; port: number };
  #backhaulAddress: { host: string; port: number } | undefined;
  #httpsAddress: { host: string; port: number } | undefined;
  #closing = false;
  #closed: Promise<void> | null = null;

  constructor(opts: ProxyClusterOptions) {
    this.#opts = opts;
    this.#log = opts.log.child({ component: 'proxy' });
    this.#address = { ...opts.http };
    // The primary's own table serves `routes`; loading and subscribing happen in one synchronous step.
    this.#index = new RouteIndex(opts.catalog, opts.hostId);
    this.#unsubscribe = opts.catalog.subscribe((batch) => {
      if (this.#index.apply(batch.revision, batch.changes)) this.#index.rebuild();
      const msg: ToWorker = { t: 'batch', batch };
      for (const w of this.#fed) if (w.isConnected()) w.send(msg);
    });
  }

  get address(): { host: string; port: number } {
    return this.#address;
  }

  get backhaulAddress(): { host: string; port: number } | undefined {
    return this.#backhaulAddress;
  }

  get httpsAddress(): { host: string; port: number } | undefined {
    return this.#httpsAddress;
  }

  get routes(): RoutingTable {
    return this.#index.table;
  }

  /** Forks every worker and resolves once all of them listen; rejects (and stops them) if one cannot. */
  async start(): Promise<void> {
    cluster.setupPrimary({
      exec: workerFile,
      execArgv: this.#opts.execArgv ?? [...proxyWorkerHeapFlags, '--import', import.meta.resolve('tsx')],
      serialization: 'advanced',
    });
    try {
      // Every worker asks for the configured address (port 0 included): the primary hands them all one listener.
      const started = [];
      for (let i = 0; i < this.#opts.workers; i++) started.push(this.#fork());
      this.#address = (await Promise.all(started))[0]!;
    } catch (err) {
      await this.close();
      throw err;
    }
    const signal = this.#opts.signal;
    if (signal) {
      if (signal.aborted) void this.close();
      else signal.addEventListener('abort', () => void this.close(), { once: true });
    }
    this.#log.info({ address: this.#address, workers: this.#opts.workers }, 'proxy cluster listening');
  }

  #fork(): Promise<{ host: string; port: number }> {
    const http = this.#opts.http;
    const w = cluster.fork();
    this.#workers.add(w);
    return new Promise((resolve, reject) => {
      let listening = false;
      // 'online' comes before the worker's module has loaded (and can hear messages): it says 'ready' itself.
      const sendInit = () => {
        const c = this.#opts.catalog;
        const options: WorkerProxyOptions = { http, logLevel: this.#opts.logLevel ?? 'info' };
        if (this.#opts.appsDomain !== undefined) options.appsDomain = this.#opts.appsDomain;
        if (this.#opts.region !== undefined) options.region = this.#opts.region;
        if (this.#opts.hostId !== undefined) options.hostId = this.#opts.hostId;
        if (this.#opts.backhaul !== undefined) options.backhaul = this.#opts.backhaul;
        if (this.#opts.https !== undefined) options.https = this.#opts.https;
        if (this.#opts.certificatesDir !== undefined) options.certificatesDir = this.#opts.certificatesDir;
        if (this.#opts.timeouts !== undefined) options.timeouts = this.#opts.timeouts;
        if (this.#opts.limits !== undefined) options.limits = this.#opts.limits;
        // One synchronous read: consistent with the batches that follow it on this channel.
        const init: ToWorker = { t: 'init', options, revision: c.revision(), apps: c.listApps(), machines: c.listMachines(), hosts: c.listHosts(), certificates: c.listCertificates() };
        w.send(init);
        this.#fed.add(w);
      };
      w.on('message', (m: FromWorker) => {
        if (m.t === 'ready') {
          sendInit();
        } else if (m.t === 'listening') {
          listening = true;
          if (m.backhaul !== undefined) this.#backhaulAddress = m.backhaul;
          if (m.https !== undefined) this.#httpsAddress = m.https;
          resolve({ host: m.host, port: m.port });
        } else if (m.t === 'failed') {
          reject(new TarmacError('unavailable', `the proxy cannot listen on ${http.host}:${http.port}: ${m.message}; free the port or configure another`));
        }
      });
      w.on('exit', (code, signal) => {
        this.#workers.delete(w);
        this.#fed.delete(w);
        if (!listening) {
          reject(new Error(`proxy worker exited before listening (code ${code}, signal ${signal})`));
          return;
        }
        if (this.#closing) return;
        this.#log.error({ worker: w.id, code, signal }, 'proxy worker exited; starting another');
        setTimeout(() => {
          if (!this.#closing) this.#fork().catch((err: unknown) => this.#log.error({ err }, 'proxy worker restart failed'));
        }, restartDelayMs).unref();
      });
    });
  }

  close(): Promise<void> {
    return (this.#closed ??= this.#close());
  }

  async #close(): Promise<void> {
    this.#closing = true;
    this.#unsubscribe();
    const drainMs = this.#opts.timeouts?.drainMs ?? 10_000;
    await Promise.all([...this.#workers].map((w) => new Promise<void>((resolve) => {
      if (w.isDead()) return resolve();
      const timer = setTimeout(() => w.process.kill('SIGKILL'), drainMs + 5_000);
      w.once('exit', () => { clearTimeout(timer); resolve(); });
      if (w.isConnected()) w.send({ t: 'close' } satisfies ToWorker);
      else w.process.kill('SIGKILL');
    })));
    this.#log.info({}, 'proxy cluster closed');
  }
}

/**
 * Starts the proxy in `workers` processes (node:cluster) that share its port. Each worker keeps its own routing table
 * from a catalog load and the change batches the primary forwards, so no request crosses processes. Balancing,
 * in-flight counts and request events are per worker.
 */
export async function startProxyCluster(opts: ProxyClusterOptions): Promise<RunningProxy> {
  if (!cluster.isPrimary) throw new Error('startProxyCluster runs in the primary process only');
  const c = new ProxyCluster(opts);
  await c.start();
  return c;
}
