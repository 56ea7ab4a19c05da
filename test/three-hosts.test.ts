// A fleet of three hosts, each in its own network namespace on a private LAN the test creates: one edge (with the
// API), two workers, a 3-member etcd cluster with one member per host. Traffic enters at the edge and crosses the
// backhaul to the workers' proxies; the test kills a worker, etcd members and all of etcd, compacts past a stopped
// host's revision, and checks that routing keeps serving and every host's mirror converges row for row.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import Database from 'better-sqlite3';
import { request } from 'undici';
import { ApiError } from '../src/client/index.ts';
import { startEtcdCluster } from './helpers/etcd.ts';
import { startRegistry } from './helpers/registry.ts';
import { httpImage } from './helpers/images.ts';
import { machineDebris, removeDebris, startHostProcess, type HostProcess } from './helpers/host-process.ts';
import { createLan, type LanHost } from './helpers/netns.ts';
import { waitFor } from './helpers/wait.ts';

const ttlSeconds = 3;
const run = promisify(execFile);

/**
 * Every row of every table of a host's catalog mirror, keyed by table, the applied revision included; left out is
 * only what is the host's own: when it last heard from etcd (meta `contacted_at`) and the events' local counter.
 */
function mirrorRows(dataDir: string): Record<string, unknown[]> {
  const db = new Database(join(dataDir, 'catalog-mirror.sqlite'), { readonly: true, fileMustExist: true });
  try {
    const out: Record<string, unknown[]> = {};
    const tables = db.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name").all() as Array<{ name: string }>;
    for (const { name } of tables) out[name] = db.prepare(`SELECT * FROM "${name}" ORDER BY 1`).all();
    out['meta'] = out['meta']!.filter((r) => (r as { key: string }).key !== 'contacted_at');
    // Events keep a local insertion counter (for ordering); the rows themselves must match.
    out['machine_events'] = db.prepare('SELECT id, machine_id, body FROM machine_events ORDER BY id').all();
    return out;
  } finally {
    db.close();
  }
}

/** AAAA answers for `name` from the internal DNS server of the host in namespace `at` (its loopback default). */
async function internalAaaa(at: LanHost, name: string): Promise<string[]> {
  const { stdout } = await run(at.wrap[0]!, [...at.wrap.slice(1), 'dig', '@127.0.0.1', '-p', '5353', '+short', '+time=2', '+tries=1', name, 'AAAA']);
  return stdout.split('\n').filter((l) => l !== '').sort();
}

/** Stops a host with Ctrl-C, or kills it when it has not exited after a while (its etcd may be gone). */
async function stopHost(h: HostProcess): Promise<void> {
  const timer = setTimeout(() => void h.kill(), 20_000);
  await h.stop().finally(() => clearTimeout(timer));
}

test('three hosts in network namespaces: edge → backhaul → workers, through a lost worker, lost etcd members and a compaction', { timeout: 420_000 }, async (t) => {
  // Cleanup runs last-in first-out: machines, hosts, etcd, registry, the LAN, the files.
  const cleanup: Array<() => Promise<unknown>> = [];
  t.after(async () => {
    for (const step of cleanup.reverse()) await step().catch((e: unknown) => t.diagnostic(`cleanup: ${String(e)}`));
  });
  const lan = await createLan(3);
  cleanup.push(() => lan.close());
  const [edgeNs, w1Ns, w2Ns] = lan.hosts as [LanHost, LanHost, LanHost];
  const root = await mkdtemp(join(tmpdir(), 'tarmac-3hosts-'));
  cleanup.push(() => rm(root, { recursive: true, force: true }));

  const etcd = await startEtcdCluster(3, { addresses: lan.hosts.map((h) => h.address), wrap: (i) => lan.hosts[i]!.wrap });
  cleanup.push(() => etcd.stop());
  const registry = await startRegistry({ address: lan.testAddress });
  cleanup.push(() => registry.stop());
  const image = await httpImage(registry.host);

  const catalog = `etcd://${etcd.endpoints.join(',')}`;
  const dataDir = (name: string) => join(root, name);
  /** Writes the host's config file and starts `tarmac host` inside its namespace. */
  const startHost = async (name: string, at: LanHost, roles: string[]): Promise<HostProcess> => {
    const config = join(root, `${name}.toml`);
    await writeFile(config, [
      `host_id = "${name}"`, 'region = "ams"', `roles = [${roles.map((r) => `"${r}"`).join(', ')}]`, `catalog = "${catalog}"`,
      `host_ttl_seconds = ${ttlSeconds}`, `insecure_registries = ["${registry.host}"]`,
      `[api]\nhost = "${at.address}"\nport = 4280`,
      `[metrics]\nhost = "127.0.0.1"\nport = 9480`,
      `[proxy]\nhttp = { host = "${at.address}", port = 8080 }\nbackhaul = { host = "${at.address}", port = 4281 }`,
      '',
    ].join('\n'));
    return startHostProcess(dataDir(name), { args: ['--config', config], wrap: at.wrap, timeoutMs: 90_000 });
  };
  const hosts = new Map<string, HostProcess>();
  cleanup.push(async () => {
    for (const h of hosts.values()) await stopHost(h);
  });
  const edge = await startHost('edge', edgeNs, ['edge', 'api']);
  hosts.set('edge', edge);
  hosts.set('w1', await startHost('w1', w1Ns, ['worker']));
  hosts.set('w2', await startHost('w2', w2Ns, ['worker']));
  const api = edge.client;

  await waitFor('all three hosts registered', async () => (await api.listHosts()).total_hosts === 3);
  await api.createApp({ app_name: 'spread', org_slug: 'personal' });
  const config = { image, services: [{ protocol: 'tcp' as const, internal_port: 8080, ports: [{ port: 80, handlers: ['http' as const] }] }] };
  const m1 = await api.createMachine('spread', { config, region: 'ams' });
  const m2 = await api.createMachine('spread', { config, region: 'ams' });
  await api.waitMachine('spread', m1.id, { state: 'started', timeout: 90 });
  await api.waitMachine('spread', m2.id, { state: 'started', timeout: 90 });
  cleanup.push(async () => {
    // Machines outlive their host processes: destroy them through the API and let each worker clean up; whatever a
    // worker that is not running (after a failure) left behind is removed by hand.
    await api.deleteApp('spread').catch(() => undefined);
    for (const w of ['w1', 'w2']) {
      const cleaned = hosts.has(w) && await waitFor(`${w} to remove its machines`, async () => (await machineDebris(dataDir(w), [m1.id, m2.id])).length === 0, 60_000)
        .then(() => true, () => false);
      if (!cleaned) await removeDebris(dataDir(w), [m1.id, m2.id]);
    }
  });

  const edgeUrl = `http://${edgeNs.address}:8080/`;
  const answer = async (): Promise<string> => {
    const res = await request(edgeUrl, { headers: { host: 'spread.localhost' } });
    return `${res.statusCode} ${(await res.body.text()).trim()}`;
  };

  // Placement put one machine on each worker; the edge runs none and reaches both over the backhaul.
  const hostsList = await api.listHosts();
  assert.deepEqual(hostsList.hosts.filter((h) => h.machines === 1).map((h) => h.id).sort(), ['w1', 'w2'], 'one machine on each worker');
  assert.equal(hostsList.hosts.find((h) => h.id === 'edge')?.machines, 0, 'the edge runs no machines');
  const seen = new Set<string>();
  await waitFor('the edge to reach both machines', async () => {
    seen.add(await answer());
    return seen.has(`200 ${m1.id}`) && seen.has(`200 ${m2.id}`);
  }, 30_000);
  for (const a of seen) assert.match(a, /^200 /);
  // Every host's DNS answers the app's machines wherever they run, from its own mirror.
  const addresses = (await api.listMachines('spread')).map((m) => m.private_ip).sort();
  assert.equal(addresses.length, 2);
  for (const at of [edgeNs, w1Ns]) {
    await waitFor('DNS to answer both machines', async () => JSON.stringify(await internalAaaa(at, 'spread.internal')) === JSON.stringify(addresses));
  }

  // Which machine lives on w2 (the worker that will be killed).
  const w2Machine = await waitFor('the machine of w2', async () => {
    for (const id of [m1.id, m2.id]) {
      const rows = mirrorRows(dataDir('edge'));
      const spec = (rows['machine_specs'] as Array<{ id: string; host_id: string }>).find((r) => r.id === id);
      if (spec?.host_id === 'w2') return id;
    }
    return undefined;
  });
  const w1Machine = w2Machine === m1.id ? m2.id : m1.id;

  // A worker dies: requests never fail (a refused backhaul connection is retried on the other machine), and once its
  // registration lapses the edge stops routing to it at all.
  await hosts.get('w2')!.kill();
  hosts.delete('w2');
  const killedAt = Date.now();
  await waitFor('w2 to leave the catalog', async () => {
    assert.equal(await answer(), `200 ${w1Machine}`);
    return !(await api.listHosts()).hosts.some((h) => h.id === 'w2');
  }, 30_000);
  assert.ok(Date.now() - killedAt < (ttlSeconds + 10) * 1000, 'the dead worker leaves within its lease time (plus detection)');
  for (let i = 0; i < 20; i++) assert.equal(await answer(), `200 ${w1Machine}`);

  // One etcd member stops: nothing changes, writes included.
  await etcd.members[1]!.stop();
  for (let i = 0; i < 5; i++) assert.equal(await answer(), `200 ${w1Machine}`);
  await api.createApp({ app_name: 'during-one-down', org_slug: 'personal' });
  await etcd.members[1]!.start();

  // All of etcd stops: routing and reads keep answering from the mirrors, writes fail fast with 503.
  await Promise.all(etcd.members.map((m) => m.stop()));
  for (let i = 0; i < 10; i++) assert.equal(await answer(), `200 ${w1Machine}`);
  const w1Address = (await api.getMachine('spread', w1Machine)).private_ip;
  assert.deepEqual(await internalAaaa(edgeNs, 'spread.internal'), [w1Address], 'DNS answers from the mirror: the live machine only');
  assert.deepEqual(await internalAaaa(w1Ns, 'spread.internal'), [w1Address]);
  const machines = await api.listMachines('spread');
  assert.equal(machines.length, 2, 'GET endpoints answer from the edge\'s mirror');
  const write = await api.createApp({ app_name: 'during-outage', org_slug: 'personal' }).then(() => undefined, (e: unknown) => e);
  assert.ok(write instanceof ApiError, 'a write while etcd is down fails');
  assert.equal(write.status, 503);

  // etcd returns: the mirrors of the running hosts converge exactly.
  await Promise.all(etcd.members.map((m) => m.start()));
  // Writes fail fast (503) until the host's catalog client has seen etcd answer again.
  await waitFor('a write to succeed again', () => api.createApp({ app_name: 'after-outage', org_slug: 'personal' }).then(() => true, (e: unknown) => {
    if (e instanceof ApiError && e.status === 503) return false;
    throw e;
  }), 30_000);
  await waitFor('edge and w1 mirrors to hold the same rows', () => {
    assert.deepEqual(mirrorRows(dataDir('w1')), mirrorRows(dataDir('edge')));
    return true;
  }, 30_000);

  // Writes move on past the stopped w2's revision and etcd compacts them away: w2 must resync from a full copy.
  await api.createApp({ app_name: 'while-w2-away', org_slug: 'personal' });
  await api.deleteApp('during-one-down');
  await etcd.compact();
  hosts.set('w2', await startHost('w2', w2Ns, ['worker']));
  await waitFor('w2 to resync and match the edge row for row', () => {
    assert.deepEqual(mirrorRows(dataDir('w2')), mirrorRows(dataDir('edge')));
    return true;
  }, 60_000);
  // Its machine kept running while its host process was away; it serves through the edge again.
  await waitFor('w2\'s machine to serve through the edge again', async () => (await answer()) === `200 ${w2Machine}`, 60_000);
});
