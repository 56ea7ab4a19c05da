// The Machines API contract, end to end: a real SQLite catalog, a real server on port 0, and the typed client.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openSqliteCatalog, type Catalog, type MachineState } from '../catalog/index.ts';
import { ApiError, TarmacClient, type CreateMachineRequest } from '../client/index.ts';
import { hashToken, newToken } from '../shared/ids.ts';
import { silentLogger } from '../shared/log.ts';
import { startApi, type RunningApi, type WorkerLink } from './index.ts';

const adminToken = 'admin-secret-token';
const image = '127.0.0.1:5000/hello:v1';

interface Env {
  catalog: Catalog;
  api: RunningApi;
  admin: TarmacClient;
  /** Token of org "acme" (role org). */
  acmeToken: string;
  acme: TarmacClient;
  client(token: string): TarmacClient;
  raw(path: string, init?: RequestInit & { token?: string | null }): Promise<Response>;
}

async function setup(t: TestContext, opts: { hostMemoryMb?: number; workers?: WorkerLink } = {}): Promise<Env> {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-api-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const catalog = openSqliteCatalog(join(dir, 'catalog.db'));
  t.after(() => catalog.close());
  const at = new Date().toISOString();
  await catalog.putOrg({ slug: 'personal', name: 'Personal', network_id: await catalog.allocateNetworkNumber(), created_at: at });
  await catalog.putOrg({ slug: 'acme', name: 'Acme', network_id: await catalog.allocateNetworkNumber(), created_at: at });
  await catalog.putHost({
    id: 'host-1', region: 'local', roles: ['edge', 'worker', 'api'], host_number: 1,
    cpus: 2, memory_mb: opts.hostMemoryMb ?? 4096, address: '127.0.0.1', updated_at: at,
  });
  const acmeToken = newToken();
  await catalog.putToken({ hash: hashToken(acmeToken), org_slug: 'acme', role: 'org', name: 'acme-deployer', created_at: at });
  const api = await startApi({
    catalog, listen: { host: '127.0.0.1', port: 0 }, log: silentLogger(), region: 'local', adminToken,
    ...(opts.workers ? { workers: opts.workers } : {}),
  });
  t.after(() => api.close());
  const client = (token: string) => new TarmacClient({ baseUrl: api.url, token });
  return {
    catalog, api, acmeToken,
    admin: client(adminToken),
    acme: client(acmeToken),
    client,
    raw: (path, init = {}) => {
      const headers = new Headers(init.headers);
      const token = init.token === undefined ? adminToken : init.token;
      if (token !== null) headers.set('authorization', `Bearer ${token}`);
      return fetch(api.url + path, { ...init, headers });
    },
  };
}

async function rejects(p: Promise<unknown>, status: number, match?: RegExp): Promise<ApiError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof ApiError, `expected ApiError, got ${String(e)}`);
    assert.equal(e.status, status, `status of "${e.message}"`);
    if (match) assert.match(e.message, match);
    return e;
  }
  assert.fail(`expected HTTP ${status}, the request succeeded`);
}

async function rawError(res: Response, status: number, match?: RegExp): Promise<string> {
  const body = (await res.json()) as { error?: unknown };
  assert.equal(res.status, status, JSON.stringify(body));
  assert.equal(typeof body.error, 'string');
  if (match) assert.match(body.error as string, match);
  return body.error as string;
}

function machineBody(extra: Partial<CreateMachineRequest> = {}): CreateMachineRequest {
  return { config: { image, guest: { cpus: 1, memory_mb: 256, cpu_kind: 'shared' } }, ...extra };
}

/** Plays the worker's part through the catalog API: records an observed state. */
async function observe(catalog: Catalog, id: string, state: MachineState, instance_id?: string): Promise<void> {
  const m = catalog.getMachine(id);
  assert.ok(m);
  await catalog.putMachineStatus({
    id, app: m.spec.app, state, instance_id: instance_id ?? m.spec.instance_id, restarts: 0, restart_generation: m.spec.restart_generation,
    updated_at: new Date().toISOString(),
    image_ref: { registry: '127.0.0.1:5000', repository: 'hello', tag: 'v1', digest: `sha256:${'a'.repeat(64)}`, labels: {} },
  });
}

function rowCounts(catalog: Catalog) {
  return {
    apps: catalog.listApps().length,
    machines: catalog.listMachines({ include_deleted: true }).length,
  };
}

test('healthz needs no token; every /v1 call needs a valid bearer token', async (t) => {
  const env = await setup(t);
  const health = await env.raw('/healthz', { token: null });
  assert.equal(health.status, 200);
  await rawError(await env.raw('/v1/apps', { token: null }), 401, /Authorization/);
  await rawError(await env.raw('/v1/apps', { token: 'wrong' }), 401, /invalid API token/);
  await rawError(await env.raw('/v1/apps', { token: null, headers: { authorization: 'Basic abc' } }), 401);
  await rejects(env.client('nope').listApps(), 401);
  assert.equal((await env.admin.listApps()).total_apps, 0);
});

test('unknown routes are 404 and wrong methods 405, as JSON', async (t) => {
  const env = await setup(t);
  await rawError(await env.raw('/v1/nothing'), 404);
  const res = await env.raw('/v1/apps', { method: 'DELETE' });
  assert.equal(res.headers.get('allow'), 'GET, POST');
  await rawError(res, 405);
  await rawError(await env.raw('/v1/apps/x/machines/y/start', { method: 'GET' }), 405);
});

test('apps: create, get, list, name taken, delete', async (t) => {
  const env = await setup(t);
  const created = await env.admin.createApp({ app_name: 'web', org_slug: 'personal' });
  assert.equal(created.name, 'web');
  assert.deepEqual(created.organization, { name: 'Personal', slug: 'personal' });
  const raw = await env.raw('/v1/apps', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ app_name: 'api', org_slug: 'personal' }) });
  assert.equal(raw.status, 201);
  assert.equal((await env.admin.getApp('web')).name, 'web');
  const list = await env.admin.listApps('personal');
  assert.equal(list.total_apps, 2);
  assert.deepEqual(list.apps.map((a) => a.name), ['api', 'web']);
  await rejects(env.admin.createApp({ app_name: 'web', org_slug: 'personal' }), 409, /already taken/);
  await rejects(env.admin.getApp('nope'), 404, /app "nope" not found/);
  await rejects(env.admin.createApp({ app_name: 'Bad_Name', org_slug: 'personal' }), 400, /^app_name: /);
  await rejects(env.admin.createApp({ app_name: 'x', org_slug: 'no-such-org' }), 404, /organization/);
  await rawError(await env.raw('/v1/apps', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ app_name: 'ok', org_slug: 'personal', colour: 'red' }) }), 400, /colour: unknown field/);
  await env.admin.deleteApp('api');
  await rejects(env.admin.getApp('api'), 404);
  await rejects(env.admin.deleteApp('api'), 404);
  assert.equal((await env.admin.listApps()).total_apps, 1);
});

test('org tokens see only their org: other apps are 404, creating elsewhere 403', async (t) => {
  const env = await setup(t);
  await env.admin.createApp({ app_name: 'mine', org_slug: 'personal' });
  const theirs = await env.acme.createApp({ app_name: 'theirs', org_slug: 'acme' });
  assert.equal(theirs.organization.slug, 'acme');
  // Without org_slug, an org token creates in its own org.
  assert.equal((await env.acme.createApp({ app_name: 'theirs2' })).organization.slug, 'acme');
  assert.deepEqual((await env.acme.listApps()).apps.map((a) => a.name), ['theirs', 'theirs2']);
  assert.equal((await env.admin.listApps()).total_apps, 3);
  await rejects(env.acme.getApp('mine'), 404);
  await rejects(env.acme.listMachines('mine'), 404);
  await rejects(env.acme.createMachine('mine', machineBody()), 404);
  await rejects(env.acme.deleteApp('mine'), 404);
  await rejects(env.acme.createApp({ app_name: 'sneaky', org_slug: 'personal' }), 403);
  await rejects(env.acme.listApps('personal'), 403);
  assert.equal(env.catalog.getApp('sneaky'), undefined);
  assert.equal((await env.admin.getApp('theirs')).name, 'theirs');
});

test('GET /v1/hosts: admin only; with the embedded catalog every host is at its revision, current, with its machine count', async (t) => {
  const env = await setup(t);
  await env.admin.createApp({ app_name: 'counted', org_slug: 'personal' });
  await env.admin.createMachine('counted', machineBody({ skip_launch: true }));
  const res = await env.admin.listHosts();
  assert.equal(res.total_hosts, 1);
  assert.equal(res.revision, env.catalog.revision());
  const [h] = res.hosts;
  assert.deepEqual({ ...h, last_seen: typeof h?.last_seen }, {
    id: 'host-1', region: 'local', roles: ['edge', 'worker', 'api'], address: '127.0.0.1', host_number: 1,
    capacity: { cpus: 2, memory_mb: 4096 }, machines: 1, revision: env.catalog.revision(), lag: 0, staleness_ms: 0, last_seen: 'string',
  });
  await rejects(env.acme.listHosts(), 403, /admin token/);
  const raw = await env.raw('/v1/apps');
  assert.equal(raw.headers.get('tarmac-catalog-stale'), null, 'the embedded catalog is never stale');
  await raw.body?.cancel();
});

test('machine create: Fly shape, placement, private address, launch event, skip_launch', async (t) => {
  const env = await setup(t);
  await env.admin.createApp({ app_name: 'web', org_slug: 'personal' });
  const m = await env.admin.createMachine('web', machineBody({ name: 'one', config: { image, env: { A: '1' }, metadata: { role: 'web' } } }));
  assert.match(m.id, /^[0-9a-f]{14}$/);
  assert.match(m.instance_id, /^[0-9A-HJKMNP-TV-Z]{26}$/);
  assert.equal(m.name, 'one');
  assert.equal(m.state, 'created');
  assert.equal(m.region, 'local');
  assert.equal(m.host_status, 'ok');
  assert.match(m.private_ip, /^fdaa:0:1:0:1:0:1:2$/);
  assert.deepEqual(m.config, { image, env: { A: '1' }, metadata: { role: 'web' } });
  assert.deepEqual(m.image_ref, { registry: '127.0.0.1:5000', repository: 'hello', tag: 'v1', digest: '', labels: {} });
  assert.equal(m.events[0]?.type, 'launch');
  assert.equal(m.events[0]?.source, 'user');
  assert.ok(m.created_at && m.updated_at);
  const spec = env.catalog.getMachine(m.id)?.spec;
  assert.equal(spec?.desired, 'started');
  assert.equal(spec?.version, 1);
  assert.equal(spec?.host_id, 'host-1');

  const second = await env.admin.createMachine('web', machineBody({ skip_launch: true }));
  assert.match(second.name, /^[a-z]+-[a-z]+-\d{4}$/);
  assert.equal(second.private_ip, 'fdaa:0:1:0:1:0:2:2');
  assert.equal(env.catalog.getMachine(second.id)?.spec.desired, 'stopped');

  // The worker's status shows through: state and resolved image_ref.
  await observe(env.catalog, m.id, 'started');
  const got = await env.admin.getMachine('web', m.id);
  assert.equal(got.state, 'started');
  assert.equal(got.image_ref.digest, `sha256:${'a'.repeat(64)}`);

  await rejects(env.admin.createMachine('web', machineBody({ name: 'one' })), 409, /already used/);
  await rejects(env.admin.createMachine('nope', machineBody()), 404);
  await rejects(env.admin.getMachine('web', 'ffffffffffffff'), 404);
  // A machine of one app is not reachable through another.
  await env.admin.createApp({ app_name: 'other', org_slug: 'personal' });
  await rejects(env.admin.getMachine('other', m.id), 404);
});

test('Fly config fields Tarmac keeps are accepted and returned as given', async (t) => {
  const env = await setup(t);
  await env.admin.createApp({ app_name: 'web', org_slug: 'personal' });
  const config = {
    image,
    mounts: [{ volume: 'vol_123', path: '/data' }],
    dns: { skip_registration: true, nameservers: ['1.1.1.1'] },
    files: [{ guest_path: '/etc/x', raw_value: 'eA==' }],
    services: [{ protocol: 'tcp' as const, internal_port: 8080, ports: [{ port: 80, handlers: ['http' as const] }], concurrency: { type: 'requests' as const, soft_limit: 10, hard_limit: 20 } }],
    checks: { alive: { type: 'http' as const, port: 8080, path: '/', interval: '10s', timeout: '2s' } },
    restart: { policy: 'on-failure' as const, max_retries: 3 },
    stop_config: { signal: 'SIGINT' as const, timeout: '5s' },
    init: { cmd: ['httpd', '-f'] },
    auto_destroy: false,
  };
  const m = await env.admin.createMachine('web', { config, skip_service_registration: true, lsvd: false });
  assert.deepEqual(m.config, config);
  assert.deepEqual((await env.admin.getMachine('web', m.id)).config, config);
});

test('bad input is 400 naming the field, and a rejected request leaves nothing behind', async (t) => {
  const env = await setup(t);
  await env.admin.createApp({ app_name: 'web', org_slug: 'personal' });
  const before = rowCounts(env.catalog);
  const post = (body: string, type = 'application/json') =>
    env.raw('/v1/apps/web/machines', { method: 'POST', headers: { 'content-type': type }, body });

  await rawError(await post('{"config": {"image": '), 400, /^invalid JSON body: /);
  await rawError(await post('{"config":{"image":"x"}}', 'text/plain'), 400, /content-type application\/json/);
  await rawError(await post(JSON.stringify({ config: { image, pad: 'x'.repeat(1024 * 1024) } })), 413, /1 MiB/);
  await rawError(await post('{}'), 400, /^config: required$/);
  await rawError(await post('[1,2]'), 400, /body: must be an object/);
  await rejects(env.admin.createMachine('web', machineBody({ config: { image, guest: { cpus: 0 } } })), 400, /^config\.guest\.cpus: must be ≥ 1$/);
  await rejects(env.admin.createMachine('web', machineBody({ config: { image, guest: { memory_mb: -1 } } })), 400, /^config\.guest\.memory_mb: must be ≥ 16$/);
  await rejects(env.admin.createMachine('web', { config: { image, guest: { cpus: 'two' } } } as unknown as CreateMachineRequest), 400, /^config\.guest\.cpus: must be a number, got string$/);
  await rejects(env.admin.createMachine('web', { config: { image }, bogus: 1 } as unknown as CreateMachineRequest), 400, /^bogus: unknown field$/);
  await rejects(env.admin.createMachine('web', { config: { image, colour: 'red' } } as unknown as CreateMachineRequest), 400, /^config\.colour: unknown field$/);
  await rejects(env.admin.createMachine('web', { config: { image, services: [{ protocol: 'tcp', internal_port: 70000 }] } } as unknown as CreateMachineRequest), 400, /^config\.services\[0\]\.internal_port: must be ≤ 65535$/);
  await rejects(env.admin.createMachine('web', { config: { image, restart: { policy: 'sometimes' } } } as unknown as CreateMachineRequest), 400, /^config\.restart\.policy: must be one of/);
  await rejects(env.admin.createMachine('web', { config: { image, env: { '1BAD': 'x' } } }), 400, /config\.env/);
  await rejects(env.admin.createMachine('web', { config: { image: 'Has Space' } }), 400, /^config\.image: /);
  await rejects(env.admin.createMachine('web', { config: { image: 'UPPER/case' } }), 400, /^config\.image: /);
  await rejects(env.admin.createMachine('web', { name: 'bad name!', config: { image } }), 400, /^name: /);
  // Several problems are listed together.
  const many = await rejects(env.admin.createMachine('web', { config: { image, guest: { cpus: 0, memory_mb: 1 } } }), 400);
  assert.match(many.message, /config\.guest\.cpus: .*; config\.guest\.memory_mb: /);
  // Placement refusals are 503 with a clear reason.
  await rejects(env.admin.createMachine('web', machineBody({ region: 'ams' })), 503, /no worker host serves region "ams" \(regions with workers: local\)/);
  await rejects(env.admin.createMachine('web', machineBody({ config: { image, guest: { memory_mb: 8192 } } })), 503, /no worker host in region "local" has room/);

  assert.deepEqual(rowCounts(env.catalog), before);
  // The address counter was not consumed either: the next machine gets machine number 1.
  const ok = await env.admin.createMachine('web', machineBody());
  assert.equal(ok.private_ip, 'fdaa:0:1:0:1:0:1:2');
});

test('placement counts the memory of machines that are not destroyed', async (t) => {
  const env = await setup(t, { hostMemoryMb: 1024 });
  await env.admin.createApp({ app_name: 'web', org_slug: 'personal' });
  const body = machineBody({ config: { image, guest: { memory_mb: 512 } } });
  const a = await env.admin.createMachine('web', body);
  await env.admin.createMachine('web', body);
  await rejects(env.admin.createMachine('web', body), 503, /has room for/);
  await env.admin.deleteMachine('web', a.id, { force: true });
  await env.admin.createMachine('web', body);
});

test('machine list filters: region, metadata, include_deleted', async (t) => {
  const env = await setup(t);
  await env.admin.createApp({ app_name: 'web', org_slug: 'personal' });
  const a = await env.admin.createMachine('web', { name: 'a', config: { image, metadata: { role: 'web', tier: '1' } } });
  const b = await env.admin.createMachine('web', { name: 'b', config: { image, metadata: { role: 'worker' } } });
  const names = (ms: Array<{ name: string }>) => ms.map((m) => m.name).sort();
  assert.deepEqual(names(await env.admin.listMachines('web')), ['a', 'b']);
  assert.deepEqual(names(await env.admin.listMachines('web', { region: 'local' })), ['a', 'b']);
  assert.deepEqual(names(await env.admin.listMachines('web', { region: 'ams' })), []);
  assert.deepEqual(names(await env.admin.listMachines('web', { metadata: { role: 'web' } })), ['a']);
  assert.deepEqual(names(await env.admin.listMachines('web', { metadata: { role: 'web', tier: '2' } })), []);
  await env.admin.deleteMachine('web', b.id, { force: true });
  await observe(env.catalog, b.id, 'destroyed');
  assert.deepEqual(names(await env.admin.listMachines('web')), ['a']);
  const all = await env.admin.listMachines('web', { include_deleted: true });
  assert.deepEqual(names(all), ['a', 'b']);
  assert.equal(all.find((m) => m.id === b.id)?.state, 'destroyed');
  assert.equal((await env.admin.getApp('web')).machine_count, 1);
  assert.ok(a.id);
});

test('update: new config, new version and instance, desired started unless skip_launch', async (t) => {
  const env = await setup(t);
  await env.admin.createApp({ app_name: 'web', org_slug: 'personal' });
  const m = await env.admin.createMachine('web', machineBody({ skip_launch: true }));
  const u = await env.admin.updateMachine('web', m.id, { config: { image: `${image}-2`.replace(':v1-2', ':v2'), env: { X: 'y' } } });
  assert.notEqual(u.instance_id, m.instance_id);
  assert.equal(u.config.env?.['X'], 'y');
  assert.equal(u.image_ref.tag, 'v2');
  assert.equal(u.id, m.id);
  assert.equal(u.private_ip, m.private_ip);
  const spec = env.catalog.getMachine(m.id)!.spec;
  assert.equal(spec.version, 2);
  assert.equal(spec.desired, 'started');
  assert.equal(spec.instance_id, u.instance_id);
  const u2 = await env.admin.updateMachine('web', m.id, { config: { image }, skip_launch: true, current_version: u.instance_id });
  assert.equal(env.catalog.getMachine(m.id)!.spec.desired, 'stopped');
  await rejects(env.admin.updateMachine('web', m.id, { config: { image }, current_version: u.instance_id }), 412, /current_version/);
  await rejects(env.admin.updateMachine('web', m.id, { config: { image }, region: 'ams' }), 400, /^region: /);
  await rejects(env.admin.updateMachine('web', m.id, { config: { image, guest: { cpus: 0 } } }), 400, /config\.guest\.cpus/);
  await rejects(env.admin.updateMachine('web', 'ffffffffffffff', { config: { image } }), 404);
  assert.equal(env.catalog.getMachine(m.id)!.spec.instance_id, u2.instance_id);
  assert.equal((await env.admin.listEvents('web', m.id))[0]?.type, 'update');
});

test('delete: 412 while started unless forced; stopped machines go; destroyed ones refuse actions', async (t) => {
  const env = await setup(t);
  await env.admin.createApp({ app_name: 'web', org_slug: 'personal' });
  const m = await env.admin.createMachine('web', machineBody());
  await rejects(env.admin.deleteMachine('web', m.id), 412, /not stopped.*force=true/);
  await observe(env.catalog, m.id, 'started');
  await rejects(env.admin.deleteMachine('web', m.id), 412);
  await env.admin.stopMachine('web', m.id);
  await observe(env.catalog, m.id, 'stopped');
  assert.deepEqual(await env.admin.deleteMachine('web', m.id), { ok: true });
  assert.equal(env.catalog.getMachine(m.id)?.spec.desired, 'destroyed');
  assert.deepEqual(await env.admin.deleteMachine('web', m.id), { ok: true }, 'deleting again is harmless');
  await rejects(env.admin.startMachine('web', m.id), 412, /destroyed/);
  await rejects(env.admin.updateMachine('web', m.id, { config: { image } }), 412, /destroyed/);

  const n = await env.admin.createMachine('web', machineBody());
  await observe(env.catalog, n.id, 'started');
  await env.admin.deleteMachine('web', n.id, { force: true });
  assert.equal(env.catalog.getMachine(n.id)?.spec.desired, 'destroyed');
  const events = await env.admin.listEvents('web', n.id);
  assert.equal(events[0]?.type, 'destroy');
  assert.deepEqual(events[0]?.request, { force: true });
});

test('deleting an app removes its machines', async (t) => {
  const env = await setup(t);
  await env.admin.createApp({ app_name: 'web', org_slug: 'personal' });
  const m = await env.admin.createMachine('web', machineBody());
  await env.admin.deleteApp('web');
  assert.equal(env.catalog.getMachine(m.id), undefined);
  assert.equal(rowCounts(env.catalog).machines, 0);
});

test('start, stop, restart and cordon write desired state and events', async (t) => {
  const env = await setup(t);
  await env.admin.createApp({ app_name: 'web', org_slug: 'personal' });
  const m = await env.admin.createMachine('web', machineBody());
  await observe(env.catalog, m.id, 'started');
  const spec = () => env.catalog.getMachine(m.id)!.spec;

  assert.deepEqual(await env.admin.stopMachine('web', m.id, { signal: 'SIGINT', timeout: '5s' }), { ok: true });
  assert.equal(spec().desired, 'stopped');
  assert.deepEqual(spec().stop, { signal: 'SIGINT', timeout_ms: 5000 });
  await rejects(env.admin.stopMachine('web', m.id, { signal: 'SIGNOPE' }), 400, /^signal: /);
  await rejects(env.admin.stopMachine('web', m.id, { timeout: 'soon' }), 400, /^timeout: /);
  await observe(env.catalog, m.id, 'stopped');

  const started = await env.admin.startMachine('web', m.id);
  assert.equal(started.previous_state, 'stopped');
  assert.equal(spec().desired, 'started');
  assert.equal(spec().restart_generation, 1, 'a start request is a new generation, so a machine that exited by itself starts too');

  await env.admin.restartMachine('web', m.id, { signal: 'SIGTERM', timeout: 3 });
  assert.equal(spec().restart_generation, 2);
  assert.deepEqual(spec().stop, { signal: 'SIGTERM', timeout_ms: 3000 });

  await env.admin.cordon('web', m.id);
  assert.equal(spec().cordoned, true);
  assert.equal((await env.admin.getMachine('web', m.id)).cordoned, true);
  await env.admin.uncordon('web', m.id);
  assert.equal(spec().cordoned, false);

  const types = (await env.admin.listEvents('web', m.id)).map((e) => e.type);
  assert.deepEqual(types, ['uncordon', 'cordon', 'restart', 'start', 'stop', 'launch']);
  const shown = await env.admin.getMachine('web', m.id);
  assert.ok(shown.events.length <= 5);
  assert.equal(shown.events[0]?.type, 'uncordon');
});

test('signal needs a started machine and a worker link; logs need a worker link', async (t) => {
  const env = await setup(t);
  await env.admin.createApp({ app_name: 'web', org_slug: 'personal' });
  const m = await env.admin.createMachine('web', machineBody());
  await rejects(env.admin.signalMachine('web', m.id, 'SIGHUP'), 412, /not started/);
  await rejects(env.admin.signalMachine('web', m.id, 'SIGWHAT'), 400, /^signal: /);
  await observe(env.catalog, m.id, 'started');
  await rejects(env.admin.signalMachine('web', m.id, 'SIGHUP'), 503, /worker link/);
  const logs = async () => {
    for await (const _ of env.admin.logs('web')) break;
  };
  await rejects(logs(), 503);
});

test('leases: acquire, 409 when held, nonce guards changes, refresh, release', async (t) => {
  const env = await setup(t);
  await env.admin.createApp({ app_name: 'web', org_slug: 'personal' });
  const m = await env.admin.createMachine('web', machineBody());
  await rejects(env.admin.getLease('web', m.id), 404);

  const lease = await env.admin.acquireLease('web', m.id, { ttl: 60, description: 'deploying' });
  assert.equal(lease.status, 'success');
  assert.match(lease.data.nonce, /^[0-9a-f]{32}$/);
  assert.equal(lease.data.description, 'deploying');
  assert.equal(lease.data.owner, 'admin');
  assert.ok(lease.data.expires_at > Date.now() / 1000 + 50);
  assert.deepEqual((await env.admin.getLease('web', m.id)).data, lease.data);

  await rejects(env.admin.acquireLease('web', m.id, { ttl: 60 }), 409, /already leased/);
  await rejects(env.admin.updateMachine('web', m.id, { config: { image } }), 409, /fly-machine-lease-nonce/);
  await rejects(env.admin.stopMachine('web', m.id, { nonce: 'wrong' }), 409, /does not match/);
  await rejects(env.admin.deleteMachine('web', m.id, { force: true }), 409);
  await env.admin.updateMachine('web', m.id, { config: { image } }, { nonce: lease.data.nonce });
  await env.admin.stopMachine('web', m.id, { nonce: lease.data.nonce });

  const refreshed = await env.admin.acquireLease('web', m.id, { ttl: 120 }, lease.data.nonce);
  assert.equal(refreshed.data.nonce, lease.data.nonce);
  assert.ok(refreshed.data.expires_at > lease.data.expires_at);

  const noHeader = await env.raw(`/v1/apps/web/machines/${m.id}/lease`, { method: 'DELETE' });
  await rawError(noHeader, 400, /fly-machine-lease-nonce/);
  await rejects(env.admin.releaseLease('web', m.id, 'wrong'), 409);
  await env.admin.releaseLease('web', m.id, lease.data.nonce);
  await rejects(env.admin.getLease('web', m.id), 404);
  await env.admin.startMachine('web', m.id);

  // lease_ttl on create leases the new machine and returns the nonce.
  const leased = await env.admin.createMachine('web', machineBody({ lease_ttl: 30 }));
  assert.match(leased.nonce ?? '', /^[0-9a-f]{32}$/);
  await rejects(env.admin.startMachine('web', leased.id), 409);
  await env.admin.startMachine('web', leased.id, { nonce: leased.nonce! });
  await rejects(env.admin.acquireLease('web', m.id, { ttl: 0 }), 400, /^ttl: /);
});

test('wait returns when the worker writes the state, 408 when it runs out', async (t) => {
  const env = await setup(t);
  await env.admin.createApp({ app_name: 'web', org_slug: 'personal' });
  const m = await env.admin.createMachine('web', machineBody());

  let settled = false;
  const waiting = env.admin.waitMachine('web', m.id, { state: 'started', timeout: 30 }).finally(() => { settled = true; });
  // The waiter is subscribed before it answers: a status for another state does not release it.
  await observe(env.catalog, m.id, 'starting');
  await new Promise((r) => setImmediate(r));
  assert.equal(settled, false);
  await observe(env.catalog, m.id, 'started');
  assert.deepEqual(await waiting, { ok: true });

  // Already there: answers at once.
  assert.deepEqual(await env.admin.waitMachine('web', m.id, { state: 'started', instance_id: m.instance_id }), { ok: true });

  const t0 = Date.now();
  await rejects(env.admin.waitMachine('web', m.id, { state: 'stopped', timeout: 1 }), 408, /did not reach state "stopped".*it is started/);
  assert.ok(Date.now() - t0 >= 900);

  // After an update, waiting for started waits for the new instance.
  const u = await env.admin.updateMachine('web', m.id, { config: { image } });
  const forNew = env.admin.waitMachine('web', m.id, { timeout: 30 });
  await observe(env.catalog, m.id, 'started', m.instance_id);
  await observe(env.catalog, m.id, 'started', u.instance_id);
  assert.deepEqual(await forNew, { ok: true });

  const destroyed = env.admin.waitMachine('web', m.id, { state: 'destroyed', timeout: 30 });
  await env.admin.deleteMachine('web', m.id, { force: true });
  await observe(env.catalog, m.id, 'destroyed');
  assert.deepEqual(await destroyed, { ok: true });

  await rejects(env.admin.waitMachine('web', m.id, { state: 'bogus' as 'started' }), 400, /^state: /);
  await rejects(env.admin.waitMachine('web', m.id, { timeout: 301 }), 400, /^timeout: /);
  await rejects(env.admin.waitMachine('web', m.id, { state: 'started', timeout: 5 }), 412, /destroyed/);
});

test('closing the API ends pending waits instead of hanging', async (t) => {
  const env = await setup(t);
  await env.admin.createApp({ app_name: 'web', org_slug: 'personal' });
  const m = await env.admin.createMachine('web', machineBody());
  const waiting = env.admin.waitMachine('web', m.id, { timeout: 300 }).then(() => 'answered', () => 'failed');
  // Another request on its own connection, so the wait has most likely reached the server.
  await env.admin.getMachine('web', m.id);
  // Were pending waits kept open, close() would hang for the wait's 300 s and the test would time out.
  await env.api.close();
  assert.equal(await waiting, 'failed');
});
