// The catalog conformance suite: every Catalog backend runs these same cases.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Catalog, Certificate, ChangeBatch, IpAssignment, MachineSpec, MachineStatus } from './types.ts';
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
    assert.equal(await code(() => c.deleteApp('web', 'another-org')), 'app_not_found', 'a delete on behalf of another org finds nothing');
    assert.ok(c.getApp('web'));
    await c.deleteApp('web', 'personal');
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

  test(`${name}: certificates belong to one app per host name, change events name them, and leave with their app`, async (t) => {
    const c = await withCatalog(t);
    await c.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() });
    await c.createApp({ name: 'api', org_slug: 'personal', network: 'default', created_at: now() });
    const seen: ChangeBatch[] = [];
    t.after(c.subscribe((b) => seen.push(b)));
    const cert = (hostname: string, app: string, over: Partial<Certificate> = {}): Certificate => ({
      hostname, app, source: 'custom', fullchain: '-----BEGIN CERTIFICATE-----', private_key: '-----BEGIN PRIVATE KEY-----',
      issuer: 'CN=test', subject: `CN=${hostname}`, not_before: now(), not_after: now(), fingerprint_sha256: 'AA', created_at: now(), ...over,
    });
    await c.putCertificate(cert('www.example.com', 'web'));
    await c.putCertificate(cert('*.example.org', 'web'));
    await c.putCertificate(cert('api.example.com', 'api'));
    assert.equal(await code(() => c.putCertificate(cert('www.example.com', 'api'))), 'name_taken');
    assert.equal(await code(() => c.putCertificate(cert('x.example.com', 'nope'))), 'app_not_found');
    await c.putCertificate(cert('www.example.com', 'web', { issuer: 'CN=renewed' }));
    assert.equal(c.getCertificate('www.example.com')?.issuer, 'CN=renewed', 'the app replaces its own certificate');
    assert.deepEqual(c.listCertificates('web').map((x) => x.hostname), ['*.example.org', 'www.example.com']);
    assert.deepEqual(c.listCertificates().map((x) => x.hostname), ['*.example.org', 'api.example.com', 'www.example.com']);
    const apiApp = c.getCertificate('api.example.com')!.app;
    assert.equal(await code(() => c.deleteCertificate('api.example.com', `not-${apiApp}`)), 'not_found', 'only its app deletes a certificate');
    assert.ok(c.getCertificate('api.example.com'));
    await c.deleteCertificate('api.example.com', apiApp);
    assert.equal(c.getCertificate('api.example.com'), undefined);
    assert.equal(await code(() => c.deleteCertificate('api.example.com')), 'not_found');
    await c.deleteApp('web');
    assert.deepEqual(c.listCertificates(), []);
    await c.putCertificate(cert('www.example.com', 'api')); // the host name is free again
    const changes = seen.flatMap((b) => b.changes).filter((ch) => ch.kind === 'certificate').map((ch) => `${ch.op} ${ch.key}`);
    assert.deepEqual(changes.slice(0, 5), ['put www.example.com', 'put *.example.org', 'put api.example.com', 'put www.example.com', 'delete api.example.com']);
    assert.deepEqual(changes.slice(5, 7).sort(), ['delete *.example.org', 'delete www.example.com'], 'deleting the app deletes its certificates');
    assert.deepEqual(changes.slice(7), ['put www.example.com']);
    const put = seen.flatMap((b) => b.changes).find((ch) => ch.kind === 'certificate' && ch.op === 'put');
    assert.equal(put?.kind === 'certificate' ? put.value?.private_key : undefined, '-----BEGIN PRIVATE KEY-----', 'subscribers (the proxy) get the key');
  });

  test(`${name}: a compare-and-swap certificate put lands only on the row it expects (the ACME lock)`, async (t) => {
    const c = await withCatalog(t);
    await c.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() });
    const pending: Certificate = {
      hostname: 'www.example.com', app: 'web', source: 'acme', fullchain: '', private_key: '', issuer: '', subject: '',
      not_before: '', not_after: '', fingerprint_sha256: '', created_at: now(), acme: { status: 'pending', challenges: [], updated_at: now() },
    };
    await c.putCertificate(pending, { expect: undefined });
    assert.equal(await code(() => c.putCertificate(pending, { expect: undefined })), 'conflict', 'expect-absent fails once the row exists');
    const held = c.getCertificate('www.example.com');
    const claims = await Promise.all(['h1', 'h2'].map((host_id) => code(() => c.putCertificate(
      { ...pending, acme: { ...pending.acme!, host_id } }, { expect: held },
    ))));
    assert.deepEqual(claims.sort(), ['conflict', 'ok'], 'of two hosts taking the same row one wins');
    assert.ok(['h1', 'h2'].includes(c.getCertificate('www.example.com')?.acme?.host_id ?? ''));
  });

  test(`${name}: an address is assigned to one app at a time and leaves with its app`, async (t) => {
    const c = await withCatalog(t);
    await c.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() });
    await c.createApp({ name: 'api', org_slug: 'personal', network: 'default', created_at: now() });
    const seen: ChangeBatch[] = [];
    t.after(c.subscribe((b) => seen.push(b)));
    const ip = (addr: string, app: string): IpAssignment => ({ ip: addr, app, type: addr.includes(':') ? 'v6' : 'v4', region: 'global', created_at: now() });
    await c.createIpAssignment(ip('127.0.1.1', 'web'));
    await c.createIpAssignment(ip('fdaa:ffff::1', 'web'));
    assert.equal(await code(() => c.createIpAssignment(ip('127.0.1.1', 'api'))), 'name_taken');
    assert.equal(await code(() => c.createIpAssignment(ip('127.0.1.1', 'web'))), 'name_taken', 'not even to its own app twice');
    assert.equal(await code(() => c.createIpAssignment(ip('127.0.1.2', 'nope'))), 'app_not_found');
    const raced = await Promise.all([1, 2, 3].map(() => code(() => c.createIpAssignment(ip('127.0.1.3', 'api')))));
    assert.deepEqual(raced.sort(), ['name_taken', 'name_taken', 'ok'], 'of concurrent assignments of one address one wins');
    assert.equal(c.getIpAssignment('127.0.1.1')?.app, 'web');
    assert.deepEqual(c.listIpAssignments('web').map((x) => x.ip), ['127.0.1.1', 'fdaa:ffff::1']);
    assert.deepEqual(c.listIpAssignments().map((x) => x.ip), ['127.0.1.1', '127.0.1.3', 'fdaa:ffff::1']);
    const ipApp = c.getIpAssignment('127.0.1.3')!.app;
    assert.equal(await code(() => c.deleteIpAssignment('127.0.1.3', `not-${ipApp}`)), 'not_found', 'only its app releases an address');
    assert.ok(c.getIpAssignment('127.0.1.3'));
    await c.deleteIpAssignment('127.0.1.3', ipApp);
    assert.equal(c.getIpAssignment('127.0.1.3'), undefined);
    assert.equal(await code(() => c.deleteIpAssignment('127.0.1.3')), 'not_found');
    await c.deleteApp('web');
    assert.deepEqual(c.listIpAssignments(), []);
    await c.createIpAssignment(ip('127.0.1.1', 'api')); // free again
    const changes = seen.flatMap((b) => b.changes).filter((ch) => ch.kind === 'ip').map((ch) => `${ch.op} ${ch.key}`);
    assert.deepEqual(changes.slice(0, 4), ['put 127.0.1.1', 'put fdaa:ffff::1', 'put 127.0.1.3', 'delete 127.0.1.3']);
    assert.deepEqual(changes.slice(4, 6).sort(), ['delete 127.0.1.1', 'delete fdaa:ffff::1'], 'deleting the app releases its addresses');
    assert.deepEqual(changes.slice(6), ['put 127.0.1.1']);
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
