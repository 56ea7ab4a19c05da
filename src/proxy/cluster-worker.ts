// Entry of a proxy cluster worker: builds its routing feed from the primary's messages and runs the proxy on the shared port.
import cluster from 'node:cluster';
import type { App, Certificate, ChangeBatch, Host, Machine } from '../catalog/index.ts';
import { createLogger } from '../shared/log.ts';
import type { FromWorker, ToWorker } from './cluster.ts';
import { startProxy, type RunningProxy } from './proxy.ts';
import { shareProxyMetricsWithPrimary, trackProxyMetrics } from './metrics.ts';
import type { RouteSource } from './routing.ts';

/** The catalog as the primary describes it: one load, then the batches it forwards, in order. */
class Feed implements RouteSource {
  readonly #listeners = new Set<(b: ChangeBatch) => void>();
  constructor(public apps: App[], public machines: Machine[], public hosts: Host[], public certificates: Certificate[], readonly rev: number) {}
  revision(): number { return this.rev; }
  /** All apps (routing needs no filter). */
  listApps(): App[] { return this.apps; }
  /** All machines (routing needs no filter). */
  listMachines(): Machine[] { return this.machines; }
  /** All registered hosts (a machine on a host that is gone gets no traffic). */
  listHosts(): Host[] { return this.hosts; }
  /** All certificates (custom host names route, and TLS serves them). */
  listCertificates(): Certificate[] { return this.certificates; }
  subscribe(fn: (b: ChangeBatch) => void): () => void {
    this.#listeners.add(fn);
    return () => this.#listeners.delete(fn);
  }
  publish(batch: ChangeBatch): void {
    for (const fn of this.#listeners) fn(batch);
  }
}

const send = (m: FromWorker) => { if (process.connected) process.send!(m); };

if (cluster.isPrimary) throw new Error('cluster-worker.ts runs as a node:cluster worker only');

let feed: Feed | undefined;
let proxy: RunningProxy | undefined;
let closing: Promise<void> | undefined;

const shutdown = () => (closing ??= (async () => {
  await proxy?.close();
  process.exit(0);
})());

// The primary decides when to stop (it drains every worker); a terminal's Ctrl-C reaches the whole group.
process.on('SIGINT', () => undefined);
process.on('SIGTERM', () => undefined);
// The primary is gone: nobody keeps the routing table current any more.
process.on('disconnect', () => void shutdown());

process.on('message', (m: ToWorker) => {
  switch (m.t) {
    case 'init': {
      const f = new Feed(m.apps, m.machines, m.hosts, m.certificates, m.revision);
      feed = f;
      const log = createLogger({ level: m.options.logLevel }).child({ worker: cluster.worker?.id });
      startProxy({ ...m.options, catalog: f, log }).then((p) => {
        proxy = p;
        trackProxyMetrics(p);
        shareProxyMetricsWithPrimary();
        f.apps = [];
        f.machines = [];
        f.certificates = [];
        send({ t: 'listening', host: p.address.host, port: p.address.port, ...(p.backhaulAddress ? { backhaul: p.backhaulAddress } : {}), ...(p.httpsAddress ? { https: p.httpsAddress } : {}) });
      }, (err: unknown) => {
        send({ t: 'failed', message: err instanceof Error ? err.message : String(err) });
        process.exit(1);
      });
      break;
    }
    case 'batch':
      // The proxy subscribed synchronously inside startProxy(), so no batch after `init` can be missed.
      feed?.publish(m.batch);
      break;
    case 'close':
      void shutdown();
      break;
  }
});

send({ t: 'ready' });
