// `tarmac host` starting while etcd is down: with a copy of the catalog it serves from it and catches up later; without
// one it waits a bounded time for etcd, then exits with one line.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request } from 'undici';
import { catalogStaleHeader } from '../src/api/index.ts';
import { TarmacClient } from '../src/client/index.ts';
import { openEtcdCatalog } from '../src/catalog/index.ts';
import { silentLogger } from '../src/shared/log.ts';
import { startEtcdCluster } from './helpers/etcd.ts';
import { startRegistry } from './helpers/registry.ts';
import { httpImage } from './helpers/images.ts';
import { removeDebris, startHostProcess, type HostProcess } from './helpers/host-process.ts';
import { waitFor } from './helpers/wait.ts';

const bin = new URL('../bin/tarmac.mjs', import.meta.url).pathname;

/** The proxy's port, from the host's banner. */
function proxyPort(h: HostProcess): number {
  const m = /Proxy\s+http:\/\/\S+:(\d+)/.exec(h.stderr());
  assert.ok(m, `no proxy in the banner: ${h.stderr()}`);
  return Number(m[1]);
}

async function answer(h: HostProcess, app: string): Promise<string> {
  const res = await request(`http://127.0.0.1:${proxyPort(h)}/`, { headers: { host: `${app}.localhost` } });
  return `${res.statusCode} ${(await res.body.text()).trim()}`;
}

/** One raw API call with the admin token of `dataDir`: status, the stale header, the JSON body. */
async function api(h: HostProcess, dataDir: string, method: string, path: string, body?: unknown) {
  const token = (await readFile(join(dataDir, 'admin-token'), 'utf8')).trim();
  const res = await fetch(`${h.apiUrl}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    signal: AbortSignal.timeout(15_000),
  });
  const text = await res.text();
  return { status: res.status, stale: res.headers.get(catalogStaleHeader), body: (text ? JSON.parse(text) : undefined) as unknown };
}

test('a host with a copy of the catalog starts while etcd is down, routes and reads from it, then registers and catches up', async (t) => {
  const etcd = await startEtcdCluster(3);
  const dataDir = await mkdtemp(join(tmpdir(), 'tarmac-startup-'));
  const ids = new Set<string>();
  const hosts: HostProcess[] = [];
  let stopRegistry: (() => Promise<void>) | undefined;
  t.after(async () => {
    // Whatever happened: etcd back so the machine can be destroyed, then everything stopped and removed.
    await Promise.all(etcd.members.map((m) => m.start()));
    const last = hosts.at(-1);
    for (const id of ids) await last?.client.deleteMachine('steady', id, { force: true }).catch(() => {});
    for (const h of hosts) await h.kill();
    await removeDebris(dataDir, ids);
    await stopRegistry?.();
    await etcd.stop();
  });
  const registry = await startRegistry();
  stopRegistry = () => registry.stop();
  const image = await httpImage(registry.host);
  const env = { TARMAC_CATALOG: `etcd://${etcd.endpoints.join(',')}` };

  const first = await startHostProcess(dataDir, { env });
  hosts.push(first);
  await first.client.createApp({ app_name: 'steady', org_slug: 'personal' });
  const config = { image, services: [{ protocol: 'tcp' as const, internal_port: 8080, ports: [{ port: 80, handlers: ['http' as const] }] }] };
  const m = await first.client.createMachine('steady', { config });
  ids.add(m.id);
  await first.client.waitMachine('steady', m.id, { state: 'started', timeout: 60 });
  await waitFor('the proxy routes to the machine', async () => (await answer(first, 'steady')) === `200 ${m.id}`);
  await first.kill(); // as in a crash or a reboot of the host alone: the machine keeps running

  // While the host is away, another writer changes the catalog; then all of etcd goes down.
  const other = await openEtcdCatalog({ endpoints: etcd.endpoints, mirrorPath: join(dataDir, 'other-writer.sqlite'), log: silentLogger() });
  await other.createApp({ name: 'while-away', org_slug: 'personal', network: 'default', created_at: new Date().toISOString() });
  await other.close();
  await Promise.all(etcd.members.map((mem) => mem.stop()));

  const h = await startHostProcess(dataDir, { env, logLevel: 'info' });
  hosts.push(h);
  // Routing and reads come from the copy, which says how old it is.
  await waitFor('the proxy routes to the machine from the copy', async () => (await answer(h, 'steady')) === `200 ${m.id}`);
  // The header comes once the copy is older than the API's threshold (3 s since it last heard from etcd).
  const listed = await waitFor('reads that say how stale the copy is', async () => {
    const r = await api(h, dataDir, 'GET', '/v1/apps/steady/machines');
    return r.stale !== null ? r : undefined;
  });
  assert.equal(listed.status, 200);
  assert.ok(Number(listed.stale) > 0, `stale header in milliseconds: ${listed.stale}`);
  assert.deepEqual((listed.body as Array<{ id: string; state: string }>).map((x) => [x.id, x.state]), [[m.id, 'started']]);
  const apps = await api(h, dataDir, 'GET', '/v1/apps');
  assert.equal(apps.status, 200);
  assert.notEqual(apps.stale, null);
  assert.deepEqual((apps.body as { apps: Array<{ name: string }> }).apps.map((a) => a.name), ['steady'], 'the copy as it was');
  const write = await api(h, dataDir, 'POST', '/v1/apps', { app_name: 'during-outage' });
  assert.equal(write.status, 503);
  assert.equal((write.body as { code: string }).code, 'unavailable');

  // etcd back: the copy catches up, the stale header goes, the host registers and writes work.
  await Promise.all(etcd.members.map((mem) => mem.start()));
  await waitFor('the copy to catch up', async () => {
    const r = await api(h, dataDir, 'GET', '/v1/apps');
    return r.stale === null && (r.body as { apps: Array<{ name: string }> }).apps.map((a) => a.name).join() === 'steady,while-away';
  }, 60_000);
  await waitFor('the host to be registered', async () => (await h.client.listHosts()).hosts.length === 1, 60_000);
  assert.equal((await api(h, dataDir, 'POST', '/v1/apps', { app_name: 'after-outage' })).status, 201);
  assert.equal(await answer(h, 'steady'), `200 ${m.id}`);
});

/** `tarmac host` on `dataDir` with the catalog on `etcd`, as a bare child process (it may never get ready). */
function spawnHost(t: TestContext, dataDir: string, endpoints: string[]) {
  const child = spawn(process.execPath, [
    bin, 'host', '--data-dir', dataDir, '--catalog', `etcd://${endpoints.join(',')}`, '--api-listen', '127.0.0.1:0',
    '--proxy-listen', '127.0.0.1:0', '--metrics-listen', '127.0.0.1:0', '--no-install', '--log-level', 'warn',
  ], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, TARMAC_API_TOKEN: '' } });
  const exited = once(child, 'exit').then(([code]) => code as number | null);
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGINT');
    await exited;
  });
  let out = '';
  let err = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  return { child, exited, log: () => out, stderr: () => err };
}

/** A stopped etcd cluster and a host starting on an empty data dir against it; all removed after the test. */
async function freshHostWithEtcdDown(t: TestContext) {
  const etcd = await startEtcdCluster(3);
  const dataDir = await mkdtemp(join(tmpdir(), 'tarmac-startup-'));
  t.after(async () => {
    await rm(dataDir, { recursive: true, force: true });
    await etcd.stop();
  });
  await Promise.all(etcd.members.map((mem) => mem.stop()));
  return { etcd, dataDir, h: spawnHost(t, dataDir, etcd.endpoints) };
}

test('a host with no copy of the catalog waits for etcd, and starts when it comes back in time', async (t) => {
  const { etcd, dataDir, h } = await freshHostWithEtcdDown(t);
  await waitFor('the host to say it waits for etcd', () => h.log().includes('no local copy of the catalog yet; retrying'), 20_000);
  await Promise.all(etcd.members.map((mem) => mem.start()));
  const apiUrl = await waitFor('the host to start', () => /Machines API\s+(http:\/\/\S+)\/v1/.exec(h.stderr())?.[1], 60_000);
  const client = new TarmacClient({ baseUrl: apiUrl, token: (await readFile(join(dataDir, 'admin-token'), 'utf8')).trim() });
  assert.deepEqual((await client.listApps()).apps, []);
  await waitFor('the host to be registered', async () => (await client.listHosts()).hosts.length === 1, 60_000);
  h.child.kill('SIGINT');
  assert.equal(await h.exited, 0);
});

test('a host with no copy of the catalog exits with one line when etcd stays down', async (t) => {
  const { h } = await freshHostWithEtcdDown(t);
  assert.equal(await h.exited, 1);
  assert.match(h.log(), /no local copy of the catalog yet; retrying/, 'it said it was waiting');
  const lines = h.stderr().trim().split('\n');
  assert.equal(lines.length, 1, `one line: ${h.stderr()}`);
  assert.match(lines[0]!, /^Error: cannot load the catalog from etcd, which did not answer within 30 s \(.+\); this host has no copy of the catalog yet, so it needs etcd to start/);
});
