// The catalog conformance suite: every Catalog backend runs these same cases.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Catalog, ChangeBatch, MachineSpec, MachineStatus } from './types.ts';
import { TarmacError } from '../shared/errors.ts';

const now = () => new Date().toISOString();

export function spec(id: string, app: string, name: string, over: Partial<MachineSpec> = {}): MachineSpec {
  return {
    id, app, name, region: 'local', host_id: 'h1', config: { image: 'busybox', metadata: { role: 'web' } },
    instance_id: `01INSTANCE${id}`, version: 1, desired: 'started', restart_generation: 0, cordoned: false,
    private_ip: 'fdaa:0:1:0:1:0:1:2', created_at: now(), updated_at: now(), ...over,
  };
}

function status(id: string, app: string, state: MachineStatus['state']): MachineStatus {
  return { id, app, state, instance_id: `01INSTANCE${id}`, restarts: 0, restart_generation: 0, updated_at: now() };
}

function code(fn: () => Promise<unknown>): Promise<string> {
  return fn().then(() => 'ok', (e: unknown) => (e instanceof TarmacError ? e.code : String(e)));
}

export function runCatalogConformance(name: string, open: () => Promise<{ catalog: Catalog; cleanup(): Promise<void> }>): void {
  async function withCatalog(t: { after(fn: () => Promise<void>): void }): Promise<Catalog> {
    const { catalog, cleanup } = await open();
    t.after(async () => { await catalog.close(); await cleanup(); });
    await catalog.putOrg({ slug: 'personal', name: 'Personal', network_id: 1, created_at: now() });
    return catalog;
  }

  test(`${name}: apps are created once and deleted with their machines`, async (t) => {
    const c = await withCatalog(t);
    await c.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() });
    assert.equal(await code(() => c.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() })), 'name_taken');
    assert.equal(await code(() => c.createApp({ name: 'x', org_slug: 'nope', network: 'default', created_at: now() })), 'not_found');
    await c.createMachine(spec('m1', 'web', 'one'), []);
    assert.deepEqual(c.listApps('personal').map((a) => a.name), ['web']);
    await c.deleteApp('web');
    assert.equal(c.getApp('web'), undefined);
    assert.equal(c.getMachine('m1'), undefined);
    assert.equal(await code(() => c.deleteApp('web')), 'app_not_found');
  });

  test(`${name}: machine names are unique among live machines of an app`, async (t) => {
    const c = await withCatalog(t);
    await c.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() });
    await c.createMachine(spec('m1', 'web', 'one'), []);
    assert.equal(await code(() => c.createMachine(spec('m2', 'web', 'one'), [])), 'name_taken');
    assert.equal(c.getMachine('m2'), undefined, 'a rejected create leaves nothing behind');
    assert.equal(await code(() => c.createMachine(spec('m3', 'nope', 'x'), [])), 'app_not_found');
    await c.updateMachineSpec({ ...spec('m1', 'web', 'one'), desired: 'destroyed', version: 2 }, 1);
    await c.createMachine(spec('m2', 'web', 'one'), []);
  });

  test(`${name}: spec updates compare versions`, async (t) => {
    const c = await withCatalog(t);
    await c.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() });
    await c.createMachine(spec('m1', 'web', 'one'), []);
    await c.updateMachineSpec({ ...spec('m1', 'web', 'one'), version: 2 }, 1);
    assert.equal(await code(() => c.updateMachineSpec({ ...spec('m1', 'web', 'one'), version: 3 }, 1)), 'conflict');
    assert.equal(c.getMachine('m1')?.spec.version, 2);
    assert.equal(await code(() => c.updateMachineSpec(spec('zz', 'web', 'z'), 1)), 'machine_not_found');
  });

  test(`${name}: listMachines filters by app, host, region, metadata and hides destroyed`, async (t) => {
    const c = await withCatalog(t);
    await c.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() });
    await c.createApp({ name: 'api', org_slug: 'personal', network: 'default', created_at: now() });
    await c.createMachine(spec('m1', 'web', 'one'), []);
    await c.createMachine(spec('m2', 'web', 'two', { region: 'fra', config: { image: 'b', metadata: { role: 'db' } } }), []);
    await c.createMachine(spec('m3', 'api', 'three', { host_id: 'h2' }), []);
    await c.putMachineStatus(status('m1', 'web', 'destroyed'));
    assert.deepEqual(c.listMachines({ app: 'web' }).map((m) => m.spec.id), ['m2']);
    assert.deepEqual(c.listMachines({ app: 'web', include_deleted: true }).map((m) => m.spec.id), ['m1', 'm2']);
    assert.deepEqual(c.listMachines({ host_id: 'h2' }).map((m) => m.spec.id), ['m3']);
    assert.deepEqual(c.listMachines({ region: 'fra' }).map((m) => m.spec.id), ['m2']);
    assert.deepEqual(c.listMachines({ metadata: { role: 'db' } }).map((m) => m.spec.id), ['m2']);
    assert.equal(c.getMachine('m1')?.status?.state, 'destroyed');
  });

  test(`${name}: subscribers see each committed batch once, in revision order`, async (t) => {
    const c = await withCatalog(t);
    const seen: ChangeBatch[] = [];
    const off = c.subscribe((b) => seen.push(b));
    await c.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() });
    await c.createMachine(spec('m1', 'web', 'one'), [{ id: 'e1', machine_id: 'm1', type: 'launch', status: 'created', source: 'user', timestamp: Date.now() }]);
    await code(() => c.createMachine(spec('m2', 'web', 'one'), []));
    await c.putMachineStatus(status('m1', 'web', 'started'));
    off();
    await c.deleteApp('web');
    assert.equal(seen.length, 3, 'the failed write produced no batch; the unsubscribed one was not seen');
    assert.ok(seen[0]!.revision < seen[1]!.revision && seen[1]!.revision < seen[2]!.revision);
    assert.deepEqual(seen[1]!.changes.map((ch) => ch.kind), ['machine_spec', 'machine_event']);
    assert.equal(c.revision(), seen[2]!.revision + 1);
  });

  test(`${name}: events are kept newest first and deduplicated by id`, async (t) => {
    const c = await withCatalog(t);
    await c.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() });
    await c.createMachine(spec('m1', 'web', 'one'), []);
    const ev = (id: string) => ({ id, machine_id: 'm1', type: 'start' as const, status: 'started', source: 'flyd' as const, timestamp: Date.now() });
    await c.appendEvents([ev('a'), ev('b')]);
    await c.appendEvents([ev('b'), ev('c')]);
    assert.deepEqual(c.listEvents('m1').map((e) => e.id), ['c', 'b', 'a']);
    assert.deepEqual(c.listEvents('m1', 1).map((e) => e.id), ['c']);
  });

  test(`${name}: leases are exclusive until they expire or are released`, async (t) => {
    const c = await withCatalog(t);
    await c.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() });
    await c.createMachine(spec('m1', 'web', 'one'), []);
    const lease = (nonce: string, ttl: number) => ({ machine_id: 'm1', nonce, owner: 'me', description: '', expires_at: Math.floor(Date.now() / 1000) + ttl, version: nonce });
    await c.putLease(lease('n1', 30), undefined);
    assert.equal(await code(() => c.putLease(lease('n2', 30), undefined)), 'lease_held');
    await c.putLease(lease('n1', 60), 'n1');
    assert.equal(await code(() => c.deleteLease('m1', 'wrong')), 'lease_held');
    await c.deleteLease('m1', 'n1');
    await c.putLease(lease('n3', -1), undefined);
    await c.putLease(lease('n4', 30), undefined); // the expired lease does not hold
    assert.equal(c.getLease('m1')?.nonce, 'n4');
  });

  test(`${name}: counters allocate distinct numbers`, async (t) => {
    const c = await withCatalog(t);
    const a = await c.allocateMachineNumber('h1');
    const b = await c.allocateMachineNumber('h1');
    const other = await c.allocateMachineNumber('h2');
    assert.notEqual(a, b);
    assert.equal(other, 1);
    assert.notEqual(await c.allocateNetworkNumber(), await c.allocateNetworkNumber());
  });
}
