// The proxy cluster against real sockets: two worker processes share a port and each follows catalog changes.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import cluster from 'node:cluster';
import { createServer, get, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { type Catalog } from '../catalog/index.ts';
import { silentLogger } from '../shared/log.ts';
import { metricsHandler, startProxyCluster, type RunningProxy } from './index.ts';
import { tempCatalog } from './testing.ts';

const now = () => new Date().toISOString();

async function backend(t: TestContext, body: string): Promise<number> {
  const server: Server = createServer((_q, s) => s.end(body));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => { server.closeAllConnections(); server.close(() => resolve()); }));
  return (server.address() as AddressInfo).port;
}

async function appWithMachine(c: Catalog, app: string, id: string, port: number): Promise<void> {
  await c.createApp({ name: app, org_slug: 'personal', network: 'default', created_at: now() });
  await c.createMachine({
    id, app, name: id, region: 'local', host_id: 'h1',
    config: { image: 'busybox', services: [{ protocol: 'tcp', internal_port: port, ports: [{ port: 80, handlers: ['http'] }] }] },
    instance_id: `01INST${id}`, version: 1, desired: 'started', restart_generation: 0, cordoned: false,
    private_ip: '127.0.0.1', created_at: now(), updated_at: now(),
  }, []);
  await c.putMachineStatus({ id, app, state: 'started', instance_id: `01INST${id}`, restarts: 0, restart_generation: 0, updated_at: now() });
}

/** One request on its own connection (so the cluster's round robin hands each to the next worker). */
function fresh(proxy: RunningProxy, host: string): Promise<{ status: number; body: string; worker: string }> {
  return new Promise((resolve, reject) => {
    const req = get({ host: '127.0.0.1', port: proxy.address.port, path: '/', headers: { host }, agent: false, timeout: 2_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => { body += d; });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body, worker: String(res.headers['fly-request-id']).slice(0, 12) }));
      res.on('error', reject);
    });
    req.on('error', reject);
    // A connection the primary handed to a worker at the instant it died is never answered.
    req.on('timeout', () => req.destroy(new Error('no answer')));
  });
}

/** Requests until `want` has come from `n` distinct workers, with a deadline. */
async function fromWorkers(proxy: RunningProxy, host: string, want: string, n: number): Promise<Set<string>> {
  const seen = new Set<string>();
  const deadline = Date.now() + 20_000;
  while (seen.size < n) {
    if (Date.now() > deadline) throw new Error(`only ${seen.size} workers answered ${want} for ${host}`);
    const r = await fresh(proxy, host).catch(() => undefined);
    if (r?.status === 200 && r.body === want) seen.add(r.worker);
    else await new Promise((resolve) => setTimeout(resolve, 10));
  }
  return seen;
}

test('two workers share the port, each routes from its own table, and both follow catalog changes', async (t) => {
  const c = await tempCatalog(t);
  await appWithMachine(c, 'web', '000000000000a1', await backend(t, 'a'));
  const proxy = await startProxyCluster({
    catalog: c, http: { host: '127.0.0.1', port: 0 }, appsDomain: 'localhost', log: silentLogger(), workers: 2, logLevel: 'silent',
  });
  t.after(() => proxy.close());
  assert.ok(proxy.address.port > 0);
  assert.equal(Object.keys(cluster.workers ?? {}).length, 2);

  assert.equal((await fromWorkers(proxy, 'web.localhost', 'a', 2)).size, 2);
  assert.equal((await fresh(proxy, 'late.localhost')).status, 404);

  // A change after start reaches every worker's table (and the primary's own view).
  await appWithMachine(c, 'late', '000000000000b1', await backend(t, 'b'));
  assert.equal((await fromWorkers(proxy, 'late.localhost', 'b', 2)).size, 2);
  assert.equal(proxy.routes.apps.get('late')?.backends.length, 1);

  // A worker that dies is replaced; the port keeps being served meanwhile by the other.
  const victim = Object.values(cluster.workers ?? {})[0]!;
  victim.process.kill('SIGKILL');
  const survivors = await fromWorkers(proxy, 'web.localhost', 'a', 1);
  assert.equal(survivors.size, 1);
  assert.equal((await fromWorkers(proxy, 'web.localhost', 'a', 2)).size, 2);
  assert.equal(Object.keys(cluster.workers ?? {}).length, 2);

  await proxy.close();
  assert.equal(Object.keys(cluster.workers ?? {}).length, 0, 'every worker exited');
});

test('the primary serves every worker\'s metrics merged: requests summed, routing table the furthest behind', async (t) => {
  const c = await tempCatalog(t);
  await appWithMachine(c, 'web', '000000000000c1', await backend(t, 'c'));
  const proxy = await startProxyCluster({
    catalog: c, http: { host: '127.0.0.1', port: 0 }, appsDomain: 'localhost', log: silentLogger(), workers: 2, logLevel: 'silent',
  });
  t.after(() => proxy.close());
  const workers = await fromWorkers(proxy, 'web.localhost', 'c', 2);
  assert.equal(workers.size, 2, 'both workers served requests');
  // Ten more, spread over the workers by the primary's round robin.
  for (let i = 0; i < 10; i++) assert.equal((await fresh(proxy, 'web.localhost')).status, 200);

  const metrics = createServer((req, res) => metricsHandler(req, res, true));
  await new Promise<void>((resolve) => metrics.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => metrics.close(() => resolve())));
  const text = await new Promise<string>((resolve, reject) => {
    get({ host: '127.0.0.1', port: (metrics.address() as AddressInfo).port, path: '/metrics' }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (d: string) => { body += d; }).on('end', () => resolve(body));
    }).on('error', reject);
  });
  const served = /^tarmac_proxy_requests_total\{app="web",status_class="2xx",error=""\} (\d+)$/m.exec(text);
  assert.ok(served, text);
  // fromWorkers made at least two 200s before the ten; every one of them, from either worker, is counted once.
  assert.ok(Number(served[1]) >= 12, `requests summed over the workers: ${served[1]}`);
  const revision = /^tarmac_proxy_routing_table_revision (\d+)$/m.exec(text);
  assert.equal(Number(revision?.[1]), c.revision(), 'both workers route by the catalog\'s current revision');
});
