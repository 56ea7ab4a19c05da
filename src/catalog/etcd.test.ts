// Runs the catalog conformance suite against the etcd backend on a real 3-member cluster, plus the mirror's behaviour.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startEtcdCluster, type EtcdCluster } from '../../test/helpers/etcd.ts';
import { waitFor } from '../../test/helpers/wait.ts';
import { silentLogger } from '../shared/log.ts';
import { TarmacError } from '../shared/errors.ts';
import { openEtcdCatalog, type EtcdCatalog } from './etcd.ts';
import { runCatalogConformance, spec } from './catalog.case.ts';
import type { Catalog, ChangeBatch } from './types.ts';

let cluster: EtcdCluster;
let dir: string;
let n = 0;
before(async () => {
  cluster = await startEtcdCluster(3);
  dir = await mkdtemp(join(tmpdir(), 'tarmac-etcdcat-'));
});
after(async () => {
  await cluster?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** A catalog on its own prefix (a fresh fleet) with its own mirror file; `prefix` shares a fleet. */
async function open(prefix = `/t${++n}/`, name = `m${++n}`, over: Partial<Parameters<typeof openEtcdCatalog>[0]> = {}): Promise<EtcdCatalog> {
  return openEtcdCatalog({ endpoints: cluster.endpoints, prefix, mirrorPath: join(dir, `${name}.sqlite`), log: silentLogger(), ...over });
}

runCatalogConformance('etcd', async () => ({ catalog: await open(), cleanup: async () => {} }));

const now = () => new Date().toISOString();
const ev = (id: string, machine_id: string) => ({ id, machine_id, type: 'start' as const, status: 'started', source: 'flyd' as const, timestamp: Date.now() });

/** Every row a catalog holds, for comparing two copies exactly. */
function dump(c: Catalog) {
  const machines = c.listMachines({ include_deleted: true });
  return {
    orgs: c.listOrgs(),
    apps: c.listApps(),
    hosts: c.listHosts(),
    machines,
    events: machines.map((m) => c.listEvents(m.spec.id, 1000)),
    leases: machines.map((m) => c.getLease(m.spec.id) ?? null),
  };
}

async function converged(a: EtcdCatalog, b: EtcdCatalog): Promise<void> {
  await waitFor('both copies at the same revision', () => a.revision() === b.revision() && a.revision() > 0, 30_000);
  assert.deepEqual(dump(b), dump(a));
}

async function seed(c: Catalog, app: string, count: number, from = 0): Promise<void> {
  for (let i = from; i < from + count; i++) {
    const id = `${app}-${i}`;
    await c.createMachine(spec(id, app, `n${i}`, { host_id: `h${i % 3}` }), [ev(`${id}-e1`, id)]);
    await c.putMachineStatus({ id, app, state: 'started', instance_id: `01INSTANCE${id}`, restarts: 0, restart_generation: 0, updated_at: now() }, [ev(`${id}-e2`, id)]);
  }
}

const codeOf = (p: Promise<unknown>) => p.then(() => 'ok', (e: unknown) => (e instanceof TarmacError ? e.code : String(e)));

test('etcd: two hosts on one cluster see each other\'s writes and converge exactly', async (t) => {
  const prefix = `/fleet${++n}/`;
  const a = await open(prefix);
  t.after(() => a.close());
  const b = await open(prefix);
  t.after(() => b.close());
  await a.putOrg({ slug: 'personal', name: 'P', network_id: 1, created_at: now() });
  await a.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() });
  await b.waitForRevision(a.revision());
  assert.equal(b.getApp('web')?.org_slug, 'personal', 'B reads A\'s app from its own copy');
  assert.equal(await codeOf(b.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() })), 'name_taken');
  await Promise.all([seed(a, 'web', 10), b.createApp({ name: 'api', org_slug: 'personal', network: 'default', created_at: now() }).then(() => seed(b, 'api', 10))]);
  // Both hosts race for the same machine name: exactly one wins.
  const race = await Promise.all([codeOf(a.createMachine(spec('x-a', 'web', 'same'), [])), codeOf(b.createMachine(spec('x-b', 'web', 'same'), []))]);
  assert.deepEqual(race.sort(), ['name_taken', 'ok']);
  // And for counters: no number is handed out twice.
  const numbers = await Promise.all([...Array(10)].map((_, i) => (i % 2 ? a : b).allocateMachineNumber('h1')));
  assert.equal(new Set(numbers).size, 10);
  await a.putLease({ machine_id: 'web-1', nonce: 'n1', owner: 'a', description: '', expires_at: Math.floor(Date.now() / 1000) + 60, version: 'n1' }, undefined);
  assert.equal(await codeOf(b.putLease({ machine_id: 'web-1', nonce: 'n2', owner: 'b', description: '', expires_at: Math.floor(Date.now() / 1000) + 60, version: 'n2' }, undefined)), 'lease_held');
  await b.deleteMachine('api-3');
  await a.deleteApp('api');
  await converged(a, b);
  assert.equal(a.listMachines({ app: 'web' }).length, 11);
  assert.equal(b.getApp('api'), undefined);
});

test('etcd: host registrations live under an etcd lease and come back when it is lost', async (t) => {
  const prefix = `/fleet${++n}/`;
  const a = await open(prefix);
  t.after(() => a.close());
  const b = await open(prefix);
  t.after(() => b.close());
  const host = { id: 'w1', region: 'local', roles: ['worker' as const], host_number: 7, cpus: 2, memory_mb: 2048, address: '127.0.0.1', updated_at: now() };
  const seen: ChangeBatch[] = [];
  b.subscribe((batch) => seen.push(batch));
  const reg = await a.registerHost(host, 3);
  await waitFor('B sees the host', () => b.getHost('w1'));
  await reg.update({ ...host, cpus: 4 });
  await waitFor('B sees the update', () => b.getHost('w1')?.cpus === 4);
  // The lease ends behind the host's back (as when it expires): the row goes, then the host registers again.
  const { Etcd3 } = await import('etcd3');
  const raw = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) });
  t.after(() => raw.close());
  const kv = (await raw.kv.range({ key: Buffer.from(`${prefix}hosts/w1`) })).kvs[0]!;
  await raw.leaseClient.leaseRevoke({ ID: kv.lease });
  await waitFor('the host row is deleted', () => seen.some((s) => s.changes.some((c) => c.kind === 'host' && c.op === 'delete')));
  await waitFor('the host registers again', () => b.getHost('w1')?.cpus === 4, 20_000);
  await reg.close();
  await waitFor('closing the registration removes the host', () => b.getHost('w1') === undefined);
});

test('etcd: one member down changes nothing; all down keeps reads and fails writes; back up, copies converge', async (t) => {
  const prefix = `/fleet${++n}/`;
  const a = await open(prefix, undefined, { callTimeoutMs: 3_000, attemptTimeoutMs: 500, heartbeatMs: 300 });
  t.after(() => a.close());
  const b = await open(prefix, undefined, { callTimeoutMs: 3_000, attemptTimeoutMs: 500, heartbeatMs: 300 });
  t.after(() => b.close());
  const batches: ChangeBatch[] = [];
  b.subscribe((batch) => batches.push(batch));
  await a.putOrg({ slug: 'personal', name: 'P', network_id: 1, created_at: now() });
  await a.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() });
  await seed(a, 'web', 3);

  // One member down: writes and propagation go on.
  const m0 = cluster.members[0]!;
  await m0.stop();
  t.after(() => m0.start());
  await seed(b, 'web', 3, 3);
  await seed(a, 'web', 3, 6);
  await converged(a, b);
  await m0.start();

  // Every member down: reads answer from the copy, writes fail with 'unavailable', staleness grows.
  const before = dump(b);
  await Promise.all(cluster.members.map((m) => m.stop()));
  t.after(() => Promise.all(cluster.members.map((m) => m.start())));
  assert.equal(await codeOf(a.createMachine(spec('web-down', 'web', 'down'), [])), 'unavailable');
  assert.equal(await codeOf(b.putMachineStatus({ id: 'web-1', app: 'web', state: 'stopped', instance_id: 'i', restarts: 0, restart_generation: 0, updated_at: now() })), 'unavailable');
  assert.deepEqual(dump(b), before);
  assert.equal(b.getMachine('web-4')?.status?.state, 'started');
  await waitFor('the copy reports itself stale', () => b.staleness() > 1_000);

  // Back up: writes resume and the copies converge with no lost and no duplicated change.
  await Promise.all(cluster.members.map((m) => m.start()));
  await waitFor('writes succeed again', () => a.createMachine(spec('web-up', 'web', 'up'), []).then(() => true), 30_000);
  await seed(a, 'web', 5, 10);
  await converged(a, b);
  assert.ok(b.staleness() < 5_000);
  const revisions = batches.map((x) => x.revision);
  assert.deepEqual(revisions, [...revisions].sort((x, y) => x - y), 'batches in revision order');
  assert.equal(new Set(revisions).size, revisions.length, 'no batch twice');
  const specPuts = batches.flatMap((x) => x.changes).filter((c) => c.kind === 'machine_spec' && c.op === 'put').map((c) => c.key);
  const expected = ['web-0', 'web-1', 'web-2', 'web-3', 'web-4', 'web-5', 'web-6', 'web-7', 'web-8', 'web-up', ...[10, 11, 12, 13, 14].map((i) => `web-${i}`)];
  assert.deepEqual(specPuts.sort(), expected.sort(), 'each machine seen exactly once');
  const eventPuts = batches.flatMap((x) => x.changes).filter((c) => c.kind === 'machine_event').map((c) => c.key);
  assert.equal(new Set(eventPuts).size, eventPuts.length, 'no event twice');
  assert.equal(eventPuts.length, 28);
});

test('etcd: a copy that fell behind compaction resyncs in one step', async (t) => {
  const prefix = `/fleet${++n}/`;
  const a = await open(prefix);
  t.after(() => a.close());
  await a.putOrg({ slug: 'personal', name: 'P', network_id: 1, created_at: now() });
  await a.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() });
  await seed(a, 'web', 5);
  const mirrorName = `behind${++n}`;
  const c1 = await open(prefix, mirrorName);
  const staleRevision = c1.revision();
  await c1.close();

  // While the host is away: machines come and go, a host registers, then history is compacted.
  await a.deleteMachine('web-0');
  await a.updateMachineSpec({ ...spec('web-1', 'web', 'n1', { host_id: 'h1' }), version: 2, desired: 'stopped' }, 1);
  await seed(a, 'web', 150, 5);
  await a.putHost({ id: 'h9', region: 'local', roles: ['worker'], host_number: 9, cpus: 1, memory_mb: 512, address: '::1', updated_at: now() });
  await cluster.compact();

  const c2 = await open(prefix, mirrorName, { pageSize: 50 });
  t.after(() => c2.close());
  assert.equal(c2.revision(), staleRevision, 'an existing copy serves reads at once');
  assert.ok(c2.getMachine('web-0'));
  const batches: ChangeBatch[] = [];
  c2.subscribe((batch) => batches.push(batch));
  await converged(a, c2);
  assert.equal(batches.length, 1, 'the resync is one batch');
  const changes = batches[0]!.changes;
  const has = (kind: string, op: string, key: string) => changes.some((c) => c.kind === kind && c.op === op && c.key === key);
  assert.ok(has('machine_spec', 'delete', 'web-0'));
  assert.ok(has('machine_spec', 'put', 'web-1'));
  assert.ok(has('machine_spec', 'put', 'web-100'));
  assert.ok(has('host', 'put', 'h9'));
  assert.ok(!has('machine_spec', 'put', 'web-2'), 'unchanged rows are not reported');
});

test('etcd: a write right after the leader dies fails over to a live member within the call time and is applied once', async (t) => {
  const prefix = `/fleet${++n}/`;
  // The call time is what one attempt used to get: success means the write moved on before it ran out.
  const a = await open(prefix, undefined, { callTimeoutMs: 3_000 });
  t.after(() => a.close());
  await a.putOrg({ slug: 'personal', name: 'P', network_id: 1, created_at: now() });
  await a.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() });
  await a.allocateMachineNumber('h1');
  const leader = await waitFor('a leader', () => cluster.leader().catch(() => undefined), 30_000);
  await leader.stop();
  t.after(() => leader.start());

  await a.createMachine(spec('fo-1', 'web', 'first'), [ev('fo-1-e1', 'fo-1')]);
  const number = await a.allocateMachineNumber('h1');
  await a.putMachineStatus({ id: 'fo-1', app: 'web', state: 'started', instance_id: 'i1', restarts: 0, restart_generation: 0, updated_at: now() }, [ev('fo-1-e2', 'fo-1')]);

  // Exactly one copy of everything, in etcd and in the local copy.
  const { Etcd3 } = await import('etcd3');
  const raw = new Etcd3({ hosts: cluster.members.filter((m) => m.running).map((m) => m.clientUrl) });
  t.after(() => raw.close());
  const keys = (await raw.getAll().prefix(prefix).keys()).sort();
  assert.deepEqual(keys.filter((k) => !/\/(orgs|apps|counters)\//.test(k)), [
    `${prefix}app-machines/web/fo-1`, `${prefix}events/fo-1/fo-1-e1`, `${prefix}events/fo-1/fo-1-e2`, `${prefix}machines/fo-1/spec`,
    `${prefix}machines/fo-1/status`, `${prefix}names/web/first`,
  ]);
  // A counter may skip a number after an unknown outcome, but never hands one out twice: it holds the next after ours.
  assert.ok(number >= 2);
  assert.equal(await raw.get(`${prefix}counters/machine-number/h1`).string(), String(number + 1));
  assert.deepEqual(a.listMachines({ app: 'web' }).map((m) => [m.spec.id, m.status?.state]), [['fo-1', 'started']]);
  assert.deepEqual(a.listEvents('fo-1').map((e) => e.id).sort(), ['fo-1-e1', 'fo-1-e2']);
  assert.equal(await codeOf(a.createMachine(spec('fo-2', 'web', 'first'), [])), 'name_taken', 'the name is held once, by fo-1');
  await leader.start();
});
