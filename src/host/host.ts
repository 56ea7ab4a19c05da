// Wires a host: catalog, orchestrator (drivers, images), Machines API and proxy, by the host's roles.
import { mkdir, readFile, writeFile, chmod } from 'node:fs/promises';
import { cpus, totalmem } from 'node:os';
import { randomBytes, randomInt } from 'node:crypto';
import { join } from 'node:path';
import { openEtcdCatalog, openSqliteCatalog, type Catalog, type EtcdCatalog, type Host, type HostRegistration } from '../catalog/index.ts';
import { startApi, type RunningApi } from '../api/index.ts';
import { metricsHandler, startProxy, startProxyCluster, trackProxyMetrics, type RunningProxy } from '../proxy/index.ts';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Orchestrator, ImageStore, createDriver, ensureHostFirewall, readLogs, type Driver } from '../orchestrator/index.ts';
import { hashToken, newToken } from '../shared/ids.ts';
import type { Logger } from '../shared/log.ts';
import type { HostConfig } from './config.ts';
import { EtcdFleetStatus } from './fleet-status.ts';
import { ensureSystemPackages, findBinary } from './system.ts';

export interface RunningHost {
  readonly config: HostConfig;
  readonly hostId: string;
  readonly adminToken: string;
  /** http://host:port of the Machines API (the /v1 paths hang off it). */
  readonly apiUrl: string | undefined;
  readonly proxy: RunningProxy | undefined;
  /** Prometheus scrape URL of this host. */
  readonly metricsUrl: string;
  readonly catalog: Catalog;
  readonly orchestrator: Orchestrator | undefined;
  close(): Promise<void>;
}

/** Starts every component the host's roles need. `close` stops them; machines keep running for the next start. */
export async function startHost(config: HostConfig, log: Logger, env: NodeJS.ProcessEnv = process.env): Promise<RunningHost> {
  const dataDir = config.data_dir;
  await mkdir(dataDir, { recursive: true, mode: 0o700 });
  const isWorker = config.roles.includes('worker');
  if (isWorker) {
    const runtimes = [config.runtime.default === 'runc' ? config.runtime.oci_binary : config.runtime.default];
    await ensureSystemPackages(runtimes, { install: config.install_packages, log });
    await ensureHostFirewall(); // machines reach neither the host nor each other, from before the first one starts
  }

  const { catalog, etcd } = await openCatalog(config, log);
  const closers: Array<() => Promise<void>> = [() => catalog.close()];
  const close = async () => {
    for (const c of closers.reverse()) await c().catch((e: unknown) => log.error({ err: e }, 'shutdown step failed'));
  };
  try {
    const hostId = await hostIdentity(dataDir, config);
    const adminToken = await ensureAdmin(catalog, dataDir, env);
    const host = await hostRow(catalog, dataDir, hostId, config);
    let fleet: EtcdFleetStatus | undefined;
    if (etcd) {
      // Registered with etcd: the registration also carries this host's report of its catalog copy.
      const registration = await etcd.registerHost(host, config.host_ttl_seconds);
      closers.push(() => registration.close());
      const f = new EtcdFleetStatus(etcd, hostId, registration, log.child({ component: 'fleet-status' }));
      f.start();
      closers.push(() => f.close());
      fleet = f;
    } else {
      const registration: HostRegistration = await catalog.registerHost(host, config.host_ttl_seconds);
      closers.push(() => registration.close());
    }
    log.info({ host: hostId, region: config.region, roles: config.roles, data_dir: dataDir }, 'host starting');

    let orchestrator: Orchestrator | undefined;
    if (isWorker) {
      const drivers: Record<string, Driver> = {};
      const dlog = log.child({ component: 'driver' });
      drivers['runc'] = createDriver('runc', { runtime: config.runtime.oci_binary, log: dlog });
      if (config.runtime.default === 'crun') drivers['crun'] = createDriver('crun', { runtime: 'crun', log: dlog });
      if (await findBinary('runsc')) drivers['runsc'] = createDriver('runsc', { log: dlog });
      const images = new ImageStore({ dir: join(dataDir, 'images'), log: log.child({ component: 'images' }), insecureRegistries: [...config.insecure_registries] });
      orchestrator = new Orchestrator({
        catalog, hostId: host.id, region: config.region, dataDir, drivers, defaultDriver: config.runtime.default, images,
        log: log.child({ component: 'orchestrator' }),
      });
      await orchestrator.start();
      const o = orchestrator;
      closers.push(() => o.close());
    }

    let api: RunningApi | undefined;
    if (config.roles.includes('api')) {
      const o = orchestrator;
      api = await startApi({
        catalog, listen: config.api, log: log.child({ component: 'api' }), region: config.region, adminToken,
        ...(fleet ? { fleet } : {}),
        ...(o ? {
          workers: {
            signal: (id: string, sig: string) => o.signal(id, sig),
            logs: (ids: string[], opts: { follow: boolean; signal: AbortSignal; since?: Date }) =>
              readLogs(ids.map((id) => ({ machineId: id, path: o.logPath(id) })), opts),
          },
        } : {}),
      });
      const a = api;
      closers.push(() => a.close());
    }

    let proxy: RunningProxy | undefined;
    if (config.roles.includes('edge') || isWorker) {
      const proxyOptions = {
        catalog, http: config.proxy.http, appsDomain: config.proxy.apps_domain, log: log.child({ component: 'proxy' }), region: config.region,
      };
      proxy = config.proxy.workers > 1
        ? await startProxyCluster({ ...proxyOptions, workers: config.proxy.workers, logLevel: config.log_level })
        : await startProxy(proxyOptions);
      const p = proxy;
      closers.push(() => p.close());
      if (config.proxy.workers === 1) { // cluster workers keep their own registries (not aggregated yet)
        const untrack = trackProxyMetrics(p);
        closers.push(async () => untrack());
      }
    }
    const metrics = await listenMetrics(config.metrics);
    closers.push(() => new Promise<void>((r) => metrics.close(() => r())));
    const m = metrics.address() as AddressInfo;
    const metricsUrl = `http://${m.family === 'IPv6' ? `[${m.address}]` : m.address}:${m.port}/metrics`;
    log.info({ api: api?.url, proxy: proxy?.address, metrics: metricsUrl }, 'host ready');
    return { config, hostId, adminToken, apiUrl: api?.url, proxy, metricsUrl, catalog, orchestrator, close };
  } catch (e) {
    await close();
    throw e;
  }
}

async function hostIdentity(dataDir: string, config: HostConfig): Promise<string> {
  if (config.host_id) return config.host_id;
  const file = join(dataDir, 'host-id');
  const existing = await readFile(file, 'utf8').then((s) => s.trim(), () => '');
  if (existing) return existing;
  const id = `host-${randomBytes(5).toString('hex')}`;
  await writeFile(file, id + '\n');
  return id;
}

/** The `personal` org and the admin token: TARMAC_API_TOKEN when set, else the one in data_dir/admin-token (made on first start). */
async function ensureAdmin(catalog: Catalog, dataDir: string, env: NodeJS.ProcessEnv): Promise<string> {
  if (!catalog.getOrg('personal')) {
    await catalog.putOrg({ slug: 'personal', name: 'Personal', network_id: await catalog.allocateNetworkNumber(), created_at: new Date().toISOString() });
  }
  const file = join(dataDir, 'admin-token');
  let token = env['TARMAC_API_TOKEN']?.trim() || (await readFile(file, 'utf8').then((s) => s.trim(), () => ''));
  if (!token) {
    token = newToken('tm');
    await writeFile(file, token + '\n', { mode: 0o600 });
  }
  await chmod(file, 0o600).catch(() => {});
  if (!catalog.findToken(hashToken(token))) {
    await catalog.putToken({ hash: hashToken(token), org_slug: 'personal', role: 'admin', name: 'admin', created_at: new Date().toISOString() });
  }
  return token;
}

async function hostRow(catalog: Catalog, dataDir: string, id: string, config: HostConfig): Promise<Host> {
  return {
    id, region: config.region, roles: [...config.roles],
    host_number: await hostNumber(catalog, dataDir),
    cpus: config.capacity.cpus || cpus().length,
    memory_mb: config.capacity.memory_mb || Math.floor(totalmem() / 2 ** 20),
    address: config.api.host, updated_at: new Date().toISOString(),
  };
}

/** This host's number, kept in the data dir: with etcd the host row vanishes with its lease, the number must not. */
async function hostNumber(catalog: Catalog, dataDir: string): Promise<number> {
  const file = join(dataDir, 'host-number');
  const kept = Number((await readFile(file, 'utf8').catch(() => '')).trim());
  if (Number.isInteger(kept) && kept > 0) return kept;
  const n = newHostNumber(catalog);
  await writeFile(file, `${n}\n`);
  return n;
}

/** The catalog backend the config names: the embedded SQLite file, or etcd mirrored into a local SQLite file. */
async function openCatalog(config: HostConfig, log: Logger): Promise<{ catalog: Catalog; etcd?: EtcdCatalog }> {
  if (config.catalog === 'sqlite') return { catalog: openSqliteCatalog(join(config.data_dir, 'catalog.sqlite')) };
  const endpoints = config.catalog.slice('etcd://'.length).split(',');
  const etcd = await openEtcdCatalog({ endpoints, mirrorPath: join(config.data_dir, 'catalog-mirror.sqlite'), log: log.child({ component: 'catalog' }) });
  return { catalog: etcd, etcd };
}

/**
 * A host number not used in this fleet. Random rather than sequential, so that separate fleets on one Linux
 * machine (two single-host data dirs, parallel test hosts) give their machines distinct private addresses.
 */
function newHostNumber(catalog: Catalog): number {
  const taken = new Set(catalog.listHosts().map((h) => h.host_number));
  for (;;) {
    const n = randomInt(1, 0x7fffffff);
    if (!taken.has(n)) return n;
  }
}

/** Serves GET /metrics (Prometheus text format) on its own listener. */
async function listenMetrics(listen: { host: string; port: number }): Promise<Server> {
  const server = createServer((req, res) => {
    if (req.method === 'GET' && req.url?.split('?')[0] === '/metrics') return void metricsHandler(req, res);
    res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try GET /metrics\n');
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(listen.port, listen.host, () => resolve());
  });
  return server;
}
