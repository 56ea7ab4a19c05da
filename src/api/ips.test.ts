// The IPs API end to end: a real SQLite catalog, two APIs on port 0 over it, the typed client; pools small enough to run out.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { rejects, twoOrgApi, type TwoOrgApi } from './testing.ts';
import { parseCidr, type IpPool, type IpRange } from '../shared/ip-pool.ts';

const range = (cidr: string) => parseCidr(cidr) as IpRange;

async function setup(t: TestContext, pool: IpPool): Promise<TwoOrgApi> {
  return twoOrgApi(t, { ipPool: pool });
}


test('addresses are allocated from the pool, listed, released and reused; v6 comes from its own range', async (t) => {
  const { admin } = await setup(t, { v4: [range('127.0.0.0/16')], v6: [range('fdaa:ffff:0:1::/120')] });
  await admin.createApp({ app_name: 'web' });
  const a = await admin.allocateIp('web', { type: 'v4' });
  assert.equal(a.ip, '127.0.0.2', 'the network address and 127.0.0.1 are never handed out');
  assert.equal(a.type, 'v4');
  assert.equal(a.shared, false);
  assert.equal(a.region, 'global');
  const b = await admin.allocateIp('web', { type: 'v4', region: 'ams' });
  assert.equal(b.ip, '127.0.0.3');
  assert.equal(b.region, 'ams');
  const v6 = await admin.allocateIp('web', { type: 'v6' });
  assert.equal(v6.ip, 'fdaa:ffff:0:1::1');
  assert.deepEqual((await admin.listIps('web')).ips.map((x) => x.ip), ['127.0.0.2', '127.0.0.3', 'fdaa:ffff:0:1::1']);
  await admin.releaseIp('web', '127.0.0.2');
  await admin.releaseIp('web', 'FDAA:FFFF:0:1:0:0:0:1');
  assert.deepEqual((await admin.listIps('web')).ips.map((x) => x.ip), ['127.0.0.3']);
  assert.equal((await admin.allocateIp('web', { type: 'v4' })).ip, '127.0.0.2', 'a released address is free again');
  await rejects(admin.releaseIp('web', '127.0.0.9'), 404, /app "web" has no address 127\.0\.0\.9/);
  await admin.deleteApp('web');
  await admin.createApp({ app_name: 'api' });
  assert.equal((await admin.allocateIp('api', { type: 'v4' })).ip, '127.0.0.2', 'deleting an app releases its addresses');
});

test('allocation input is validated with the field named; other orgs see nothing; an empty pool is said so', async (t) => {
  const { admin, acme } = await setup(t, { v4: [range('127.0.5.0/30')], v6: [] });
  await admin.createApp({ app_name: 'web' });
  await rejects(admin.allocateIp('web', { type: 'v5' as 'v4' }), 400, /type: /);
  await rejects(admin.allocateIp('web', { type: 'v4', region: 'Not A Region' }), 400, /region: must be a region code/);
  await rejects(admin.allocateIp('web', { type: 'v4', org_slug: 'acme' }), 400, /org_slug: app "web" belongs to organization "personal"/);
  await rejects(admin.allocateIp('web', { type: 'v4', service_name: 'x' } as { type: 'v4' }), 400, /service_name: unknown field/);
  await rejects(admin.allocateIp('web', { type: 'v6' }), 412, /type: this fleet has no IPv6 pool/);
  await rejects(admin.releaseIp('web', 'not-an-ip'), 400, /ip: "not-an-ip" is not an IPv4 or IPv6 address/);
  await rejects(acme.allocateIp('web', { type: 'v4' }), 404, /app "web" not found/);
  await rejects(acme.listIps('web'), 404, /app "web" not found/);
  // A /30 holds two usable addresses.
  assert.equal((await admin.allocateIp('web', { type: 'v4', org_slug: 'personal' })).ip, '127.0.5.1');
  assert.equal((await admin.allocateIp('web', { type: 'v4' })).ip, '127.0.5.2');
  await rejects(admin.allocateIp('web', { type: 'v4' }), 503, /every address of the v4 pool \(127\.0\.5\.0\/30\) is assigned/);
  await rejects(acme.releaseIp('web', '127.0.5.1'), 404, /app "web" not found/);
});

test('two APIs allocating at once never hand out the same address', async (t) => {
  const { admin, other } = await setup(t, { v4: [range('127.0.8.0/24')], v6: [] });
  await admin.createApp({ app_name: 'web' });
  await admin.createApp({ app_name: 'api' });
  const got = await Promise.all(Array.from({ length: 20 }, (_, i) => (i % 2 === 0 ? admin : other).allocateIp(i % 3 === 0 ? 'web' : 'api', { type: 'v4' })));
  const ips = got.map((x) => x.ip);
  assert.equal(new Set(ips).size, 20, `distinct addresses: ${ips.join(' ')}`);
  const listed = [...(await admin.listIps('web')).ips, ...(await admin.listIps('api')).ips].map((x) => x.ip).sort();
  assert.deepEqual(listed, [...ips].sort());
});

test('a proxy_proto port\'s version is v1 or v2: anything else is a 400 naming the field', async (t) => {
  const { admin, catalog } = await setup(t, { v4: [range('127.0.10.0/24')], v6: [] });
  await catalog.putHost({ id: 'h1', region: 'local', roles: ['worker'], host_number: 1, cpus: 2, memory_mb: 4096, address: '127.0.0.1', updated_at: new Date().toISOString() });
  await admin.createApp({ app_name: 'db' });
  const config = (version: 'v1' | 'v2') => ({
    image: 'busybox', services: [{ protocol: 'tcp' as const, internal_port: 5432, ports: [{ port: 5432, handlers: ['proxy_proto' as const], proxy_proto_options: { version } }] }],
  });
  await rejects(admin.createMachine('db', { config: config('v3' as 'v2') }), 400, /config\.services\[0\]\.ports\[0\]\.proxy_proto_options\.version: /);
  const m = await admin.createMachine('db', { config: config('v2') });
  assert.deepEqual(m.config.services?.[0]?.ports?.[0]?.proxy_proto_options, { version: 'v2' });
});
