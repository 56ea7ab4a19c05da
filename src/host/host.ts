// Wires a host: catalog, orchestrator (drivers, images), Machines API and proxy, by the host's roles.
import { mkdir, readFile, writeFile, chmod } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { randomBytes, randomInt } from 'node:crypto';
import { join } from 'node:path';
import { openEtcdCatalog, openSqliteCatalog, privateDnsAddress, type Catalog, type EtcdCatalog, type Host, type HostRegistration } from '../catalog/index.ts';
import { startApi, type RunningApi } from '../api/index.ts';
import {
  haproxyBinary, metricsHandler, startAutostop, startHaproxyPlane, startProxy, startProxyCluster, startStoppedMachine, stopIdleMachine, trackProxyMetrics, type RunningProxy,
} from '../proxy/index.ts';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Orchestrator, ImageStore, createDriver, ensureHostFirewall, readLogs, FIREWALL_TABLE, NETWORKS_SET, type Driver } from '../orchestrator/index.ts';
import { hostMeshAddress, meshIdentity, startLocalNetworks, startMesh, MIN_MESH_HOST_NUMBER } from '../mesh/index.ts';
import { parseUpstream, startDns, upstreamsFromResolvConf, type RunningDns } from '../dns/index.ts';
import { AcmeManager, defaultAcmePolicy } from '../acme/index.ts';
import { TarmacError, errorMessage } from '../shared/errors.ts';
import { hashToken, newToken } from '../shared/ids.ts';
import type { Logger } from '../shared/log.ts';
import { httpsListen, ipPoolOf, meshEndpoint, type HostConfig } from './config.ts';
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
  /** The internal DNS server (undefined when dns.enabled is false). */
  readonly dns: RunningDns | undefined;
  /** The ACME manager (undefined when acme.enabled is false). */
  readonly acme: AcmeManager | undefined;
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
    await ensureHostFirewall(); // machines reach neither the host nor other orgs, from before the first one starts
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
    const meshId = config.mesh.enabled ? await meshIdentity({ dataDir, hostNumber: host.host_number, endpoint: meshEndpoint(config) }) : undefined;
    if (meshId) host.mesh = meshId.row;
    // With the mesh, the backhaul goes over it by default: edges reach this host's proxy at its mesh address.
    const backhaul = config.proxy.backhaul ?? (meshId && isWorker ? { host: hostMeshAddress(host.host_number), port: defaultBackhaulPort } : undefined);
    if (backhaul) host.backhaul = formatHostPort(backhaul);
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

    const dns = config.dns.enabled ? await startHostDns(config, catalog, isWorker, log) : undefined;
    if (dns) closers.push(() => dns.close());

    if (meshId) {
      const mesh = await startMesh({
        catalog, hostId, hostNumber: host.host_number, identity: meshId, dataDir, listenPort: config.mesh.listen_port,
        firewall: { table: FIREWALL_TABLE, set: NETWORKS_SET }, log: log.child({ component: 'mesh' }),
      });
      closers.push(() => mesh.close());
    } else if (isWorker) {
      // No mesh: each organization's machines on this host still form one network (and reach no other).
      const local = await startLocalNetworks({ catalog, firewall: { table: FIREWALL_TABLE, set: NETWORKS_SET }, log: log.child({ component: 'network' }) });
      closers.push(() => local.close());
    }

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
        catalog, listen: config.api, log: log.child({ component: 'api' }), region: config.region, adminToken, ipPool: ipPoolOf(config.proxy), appsDomain: config.proxy.apps_domain,
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
        hostId, ...(backhaul ? { backhaul } : {}),
        https: httpsListen(config.proxy), certificatesDir: join(dataDir, 'tls'), appAddresses: config.roles.includes('edge'),
      };
      const autostart = { catalog, start: (id: string) => startStoppedMachine(catalog, id) };
      proxy = config.proxy.workers > 1
        ? await startProxyCluster({ ...proxyOptions, workers: config.proxy.workers, logLevel: config.log_level })
        : proxyEngineOf(config) === 'haproxy'
          ? await startHaproxyPlane({ ...proxyOptions, autostart, stateDir: join(dataDir, 'haproxy') }).catch(async (err: unknown) => {
            if (config.proxy.engine !== undefined) throw err;
            log.warn({ reason: errorMessage(err) }, 'HAProxy could not start: the Node proxy takes the HTTP port alone (set proxy.engine to choose)');
            return startProxy({ ...proxyOptions, autostart });
          })
          : await startProxy({ ...proxyOptions, autostart });
      const p = proxy;
      closers.push(() => p.close());
      if (config.proxy.workers === 1) { // a cluster's workers track their own; the metrics listener merges them
        const untrack = trackProxyMetrics(p);
        closers.push(async () => untrack());
      }
      // Autostart and autostop need one process to see every request (a cluster spreads them over its workers).
      if (config.proxy.workers === 1 && isWorker) {
        const autostop = startAutostop({
          routes: () => p.routes, catalog, hostId, idleMs: config.proxy.autostop_idle_ms,
          stop: (id) => stopIdleMachine(catalog, id), log: log.child({ component: 'autostop' }),
        });
        closers.push(async () => autostop.close());
      }
    }
    const acme = config.acme.enabled ? await startAcme(config, catalog, hostId, log) : undefined;
    if (acme) closers.push(() => acme.close());
    const metrics = await listenMetrics(config.metrics, proxy !== undefined && config.proxy.workers > 1);
    closers.push(() => new Promise<void>((r) => metrics.close(() => r())));
    const m = metrics.address() as AddressInfo;
    const metricsUrl = `http://${formatHostPort({ host: m.address, port: m.port })}/metrics`;
    log.info({ api: api?.url, proxy: proxy?.address, metrics: metricsUrl }, 'host ready');
    return { config, hostId, adminToken, apiUrl: api?.url, proxy, metricsUrl, catalog, orchestrator, dns, acme, close };
  } catch (e) {
    await close();
    throw e;
  }
}

/** The ACME manager of a host with `acme.enabled`: orders and renewals for the whole fleet, account key under data_dir/acme. */
async function startAcme(config: HostConfig, catalog: Catalog, hostId: string, log: Logger): Promise<AcmeManager> {
  const c = config.acme;
  const caPem = c.ca_file === undefined ? undefined : await readFile(c.ca_file, 'utf8').catch((e: unknown) => {
    throw new TarmacError('invalid_argument', `acme.ca_file: cannot read ${c.ca_file}: ${(e as Error).message}`, { cause: e });
  });
  const manager = new AcmeManager({
    catalog, hostId, challenges: c.challenges, checkIntervalMs: c.check_interval_seconds * 1000,
    policy: { ...defaultAcmePolicy, renewBeforeMs: c.renew_before_days * 86_400_000 },
    account: { directoryUrl: c.directory, email: c.email, caPem, dir: join(config.data_dir, 'acme') },
    log: log.child({ component: 'acme' }),
  });
  manager.start();
  return manager;
}

/** The internal DNS server: the operator's listener, and [fdaa::3]:53 for the machines of a worker. */
async function startHostDns(config: HostConfig, catalog: Catalog, isWorker: boolean, log: Logger): Promise<RunningDns> {
  const upstreams = config.dns.upstreams.length > 0
    ? config.dns.upstreams.map(parseUpstream)
    : upstreamsFromResolvConf(await readFile('/etc/resolv.conf', 'utf8').catch(() => ''));
  const dnsLog = log.child({ component: 'dns' });
  const dns = await startDns({
    engine: config.dns.engine, stateDir: join(config.data_dir, 'dns'), // none set: unbound if it starts, else node
    catalog, upstreams, trusted: config.dns.trusted, region: config.region, log: dnsLog,
    listen: [config.dns.listen, ...(isWorker ? [{ host: privateDnsAddress, port: 53 }] : [])],
  });
  dnsLog.info({ engine: dns.engine, explicit: config.dns.engine !== undefined }, 'dns engine');
  return dns;
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

/** The proxy engine: as configured, else HAProxy where it is installed and the proxy runs in the host process. */
export function proxyEngineOf(config: HostConfig): 'node' | 'haproxy' {
  return config.proxy.engine ?? (config.proxy.workers === 1 && existsSync(haproxyBinary) ? 'haproxy' : 'node');
}

/** Port of the backhaul listener a mesh host opens at its mesh address when `proxy.backhaul` does not say otherwise. */
const defaultBackhaulPort = 4281;

/** `host:port`, IPv6 hosts in brackets. */
function formatHostPort(l: { host: string; port: number }): string {
  return `${l.host.includes(':') ? `[${l.host}]` : l.host}:${l.port}`;
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
 * machine (two single-host data dirs, parallel test hosts) give their machines distinct private addresses; the top
 * bit is set, as the mesh's host-first wire addresses need (docs/mesh.md).
 */
function newHostNumber(catalog: Catalog): number {
  const taken = new Set(catalog.listHosts().map((h) => h.host_number));
  for (;;) {
    const n = randomInt(MIN_MESH_HOST_NUMBER, 0x1_0000_0000);
    if (!taken.has(n)) return n;
  }
}

/** Serves GET /metrics (Prometheus text format) on its own listener. */
async function listenMetrics(listen: { host: string; port: number }, proxyCluster: boolean): Promise<Server> {
  const server = createServer((req, res) => {
    if (req.method === 'GET' && req.url?.split('?')[0] === '/metrics') return void metricsHandler(req, res, proxyCluster);
    res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try GET /metrics\n');
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(listen.port, listen.host, () => resolve());
  });
  return server;
}
