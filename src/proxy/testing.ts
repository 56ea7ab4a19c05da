// Helpers for the proxy's own tests: a temp SQLite catalog with apps and machines, and a proxy over it on loopback.
import type { TestContext } from 'node:test';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openSqliteCatalog, type Catalog, type MachineConfig, type MachineSpec } from '../catalog/index.ts';
import { silentLogger } from '../shared/log.ts';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { existsSync } from 'node:fs';
import { startHaproxyPlane } from './haproxy/plane.ts';
import { haproxyBinary, parseStatCsv } from './haproxy/process.ts';
import { connect } from 'node:net';
import { proxyQueueChannel, startProxy, type ProxyLimits, type ProxyOptions, type ProxyQueueEvent, type ProxyTimeouts, type RunningProxy } from './proxy.ts';

const now = () => new Date().toISOString();

/** A SQLite catalog in a temp dir with one org and one registered host `h1`, removed after the test. */
export async function tempCatalog(t: TestContext): Promise<Catalog> {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-proxy-'));
  const catalog = openSqliteCatalog(join(dir, 'catalog.sqlite'));
  t.after(async () => {
    await catalog.close();
    await rm(dir, { recursive: true, force: true });
  });
  await catalog.putOrg({ slug: 'personal', name: 'Personal', network_id: 1, created_at: now() });
  await catalog.putHost({ id: 'h1', region: 'local', roles: ['worker'], host_number: 1, cpus: 2, memory_mb: 4096, address: '127.0.0.1', updated_at: now() });
  return catalog;
}

export async function createApp(c: Catalog, name: string): Promise<void> {
  await c.createApp({ name, org_slug: 'personal', network: 'default', created_at: now() });
}

type Service = NonNullable<MachineConfig['services']>[number];

/** One http service on port 80 forwarding to `internalPort`, with an optional concurrency setting. */
export function httpService(internalPort: number, concurrency?: Service['concurrency']): Service[] {
  return [{ protocol: 'tcp', internal_port: internalPort, ports: [{ port: 80, handlers: ['http'] }], ...(concurrency ? { concurrency } : {}) }];
}

let seq = 0;

/** A started machine of `app` on 127.0.0.1 (host `h1`, region `local` unless `at` says), written as the API and the worker would: spec, then status. */
export async function startedMachine(c: Catalog, app: string, services: Service[], at: { host?: string; region?: string } = {}): Promise<string> {
  const id = `${(++seq).toString(16).padStart(8, '0')}${process.pid.toString(16).padStart(6, '0')}`;
  const spec: MachineSpec = {
    id, app, name: `m${seq}`, region: at.region ?? 'local', host_id: at.host ?? 'h1', config: { image: 'busybox', services },
    instance_id: `01INST${id}`, version: 1, desired: 'started', restart_generation: 0, cordoned: false,
    private_ip: '127.0.0.1', created_at: now(), updated_at: now(),
  };
  await c.createMachine(spec, []);
  await c.putMachineStatus({ id, app, state: 'started', instance_id: `01INST${id}`, restarts: 0, restart_generation: 0, updated_at: now() });
  return id;
}

/** Which proxy takes the HTTP port: the Node proxy alone, or HAProxy in front of it (where HAProxy is installed). */
export type ProxyEngine = 'node' | 'haproxy';
export const proxyEngines: readonly ProxyEngine[] = existsSync(haproxyBinary) ? ['node', 'haproxy'] : ['node'];

/** `proxyFor` on either engine; the HAProxy data plane keeps its state in a temp dir removed after the test. */
export async function proxyOn(
  engine: ProxyEngine, t: TestContext, catalog: Catalog, timeouts: ProxyTimeouts = {}, limits: ProxyLimits = {},
): Promise<RunningProxy> {
  if (engine === 'node') return proxyFor(t, catalog, timeouts, limits);
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-haproxy-'));
  const plane = await startHaproxyPlane({
    catalog, http: { host: '127.0.0.1', port: 0 }, appsDomain: 'localhost', log: silentLogger(), region: 'test-region', timeouts, limits,
    stateDir: dir, threads: 1,
  });
  t.after(async () => {
    await plane.close();
    await rm(dir, { recursive: true, force: true });
  });
  haproxyDirs.set(plane, dir);
  return plane;
}

const haproxyDirs = new WeakMap<RunningProxy, string>();

/** The state dir (config, sockets) of a proxy `proxyOn` started on the haproxy engine. */
export function haproxyStateDir(proxy: RunningProxy): string {
  const dir = haproxyDirs.get(proxy);
  if (dir === undefined) throw new Error('not a proxy proxyOn started on the haproxy engine');
  return dir;
}

/** One command on a HAProxy runtime API socket (`<state dir>/admin.sock`). */
export function haproxyAdmin(socket: string, line: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(socket);
    let out = '';
    s.setEncoding('utf8');
    s.on('data', (d: string) => { out += d; });
    s.on('end', () => resolve(out));
    s.on('error', reject);
    s.end(`${line}\n`);
  });
}

/** `show stat` rows of the HAProxy of a proxy `proxyOn` started on the haproxy engine. */
export async function haproxyStats(proxy: RunningProxy): Promise<Record<string, string>[]> {
  return parseStatCsv(await haproxyAdmin(join(haproxyStateDir(proxy), 'admin.sock'), 'show stat'));
}

export async function proxyFor(
  t: TestContext, catalog: Catalog, timeouts: ProxyTimeouts = {}, limits: ProxyLimits = {}, more: Partial<ProxyOptions> = {},
): Promise<RunningProxy> {
  const proxy = await startProxy({
    catalog, http: { host: '127.0.0.1', port: 0 }, appsDomain: 'localhost', log: silentLogger(), region: 'test-region', timeouts, limits, ...more,
  });
  t.after(() => proxy.close());
  return proxy;
}

/** Follows the proxy's queue-length events for the rest of the test; the returned function reads the latest length. */
export function queueLength(t: TestContext): () => number {
  let queued = 0;
  const onQueue = (m: unknown) => { queued = (m as ProxyQueueEvent).queued; };
  subscribe(proxyQueueChannel, onQueue);
  t.after(() => unsubscribe(proxyQueueChannel, onQueue));
  return () => queued;
}
