// Two hosts on one etcd catalog: placement spreads an app over both, each host's proxy reaches every machine.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'undici';
import { startEtcdCluster } from './helpers/etcd.ts';
import { startRegistry } from './helpers/registry.ts';
import { httpImage } from './helpers/images.ts';
import { startTestHost, type TestHost } from './helpers/host.ts';
import { machineDebris } from './helpers/host-process.ts';
import { waitFor } from './helpers/wait.ts';

async function answer(h: TestHost, app: string): Promise<string> {
  const res = await request(`${h.proxyUrl}/`, { headers: { host: `${app}.localhost` } });
  return `${res.statusCode} ${(await res.body.text()).trim()}`;
}

test('two hosts share an etcd catalog: machines spread over both, every proxy routes to all of them, a departed host leaves routing', async (t) => {
  const etcd = await startEtcdCluster(3);
  t.after(() => etcd.stop());
  const registry = await startRegistry();
  t.after(() => registry.stop());
  const image = await httpImage(registry.host);
  const catalog = `etcd://${etcd.endpoints.join(',')}`;
  const a = await startTestHost({ config: { catalog, host_id: 'host-a' } });
  t.after(() => a.close());
  const b = await startTestHost({ config: { catalog, host_id: 'host-b' } });
  t.after(() => b.close());

  // Each host sees the other's registration through its own mirror.
  await waitFor('both hosts registered on both mirrors', () => a.host.catalog.listHosts().length === 2 && b.host.catalog.listHosts().length === 2);
  assert.notEqual(a.host.catalog.getHost('host-a')?.host_number, a.host.catalog.getHost('host-b')?.host_number);

  await a.client.createApp({ app_name: 'spread', org_slug: 'personal' });
  const config = { image, services: [{ protocol: 'tcp' as const, internal_port: 8080, ports: [{ port: 80, handlers: ['http' as const] }] }] };
  const m1 = await a.client.createMachine('spread', { config });
  const m2 = await b.client.createMachine('spread', { config }); // through the other host's API
  const hostsOf = () => new Set([m1.id, m2.id].map((id) => a.host.catalog.getMachine(id)?.spec.host_id));
  // The machine made through b reaches a's mirror over etcd's watch, a moment later.
  await waitFor('both machines in a\'s mirror', () => [m1.id, m2.id].every((id) => a.host.catalog.getMachine(id) !== undefined));
  assert.deepEqual([...hostsOf()].sort(), ['host-a', 'host-b'], 'placement spreads the app over both workers');
  await a.client.waitMachine('spread', m1.id, { state: 'started', timeout: 60 });
  await b.client.waitMachine('spread', m2.id, { state: 'started', timeout: 60 });

  for (const h of [a, b]) {
    const seen = new Set<string>();
    await waitFor('this proxy to reach both machines', async () => {
      seen.add(await answer(h, 'spread'));
      return seen.has(`200 ${m1.id}`) && seen.has(`200 ${m2.id}`);
    });
  }
  // Reads on either host agree row for row.
  assert.deepEqual(a.host.catalog.listMachines({ app: 'spread' }), b.host.catalog.listMachines({ app: 'spread' }));

  // Host b goes away (its registration ends): its machine leaves every routing table, traffic keeps flowing to a's.
  await b.stopHostOnly();
  await waitFor('host b to leave the catalog', () => a.host.catalog.getHost('host-b') === undefined);
  // The proxy's data plane (HAProxy) takes the change a moment after the catalog mirror.
  await waitFor('host b\'s machine to leave a\'s routing', () => !a.host.proxy!.routes.apps.get('spread')?.backends.some((x) => x.machineId === m2.id));
  for (let i = 0; i < 10; i++) assert.equal(await answer(a, 'spread'), `200 ${m1.id}`);
  await b.restart(); // b comes back, reattaches to its machine and routes to it again
  await waitFor('host b\'s machine to serve again', async () => (await answer(a, 'spread')) === `200 ${m2.id}`);

  await b.client.deleteApp('spread');
  await waitFor('both hosts to remove their machines', async () =>
    (await machineDebris(a.dataDir, [m1.id, m2.id])).length === 0 && (await machineDebris(b.dataDir, [m1.id, m2.id])).length === 0, 30_000);
});
