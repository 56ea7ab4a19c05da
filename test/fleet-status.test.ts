// Fleet status on an etcd catalog: every host reports its catalog copy, `tarmac status --hosts` shows them all, a dead host drops out.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ApiError, TarmacClient, type ListHostsResponse } from '../src/client/index.ts';
import { hashToken, newToken } from '../src/shared/ids.ts';
import { startEtcdCluster } from './helpers/etcd.ts';
import { startTestHost, type TestHost } from './helpers/host.ts';
import { machineDebris, removeDebris } from './helpers/host-process.ts';
import { waitFor } from './helpers/wait.ts';

const bin = fileURLToPath(new URL('../bin/tarmac.mjs', import.meta.url));

/** Runs the real `tarmac` binary; resolves with its exit code and output. */
async function tarmac(args: string[], env: Record<string, string> = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [bin, ...args], {
    env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin', HOME: process.env['HOME'] ?? '/root', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const [code] = (await once(child, 'close')) as [number | null];
  return { code, stdout, stderr };
}

/** `tarmac host --config FILE` as a child process (so it can die without revoking its registration); resolves once its API answers. */
async function startHostProcess(config: string, token: string): Promise<{ child: ChildProcess; client: TarmacClient; kill(): Promise<void> }> {
  const child = spawn(process.execPath, [bin, 'host', '--config', config], {
    env: { ...process.env, TARMAC_API_TOKEN: token }, stdio: ['ignore', 'ignore', 'pipe'],
  });
  const exited = once(child, 'exit');
  let err = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const kill = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  };
  try {
    const url = await waitFor('host process ready', () => {
      if (child.exitCode !== null) throw new Error(`host exited: ${err}`);
      return /Machines API\s+(http:\/\/\S+)\/v1/.exec(err)?.[1];
    }, 60_000);
    return { child, client: new TarmacClient({ baseUrl: url, token }), kill };
  } catch (e) {
    await kill();
    throw e;
  }
}

const hostIds = (r: ListHostsResponse) => r.hosts.map((h) => h.id).sort();

test('every host reports its catalog copy; `tarmac status --hosts` shows the fleet; a killed host drops out within its TTL', async (t) => {
  const etcd = await startEtcdCluster(1);
  const bDir = await mkdtemp(join(tmpdir(), 'tarmac-host-b-'));
  let a: TestHost | undefined;
  let b: Awaited<ReturnType<typeof startHostProcess>> | undefined;
  const bMachines: string[] = [];
  t.after(async () => {
    await b?.kill();
    try {
      await a?.close();
    } finally {
      const debris = await machineDebris(bDir, bMachines);
      await removeDebris(bDir, bMachines);
      await etcd.stop();
      assert.deepEqual(debris, [], 'host b left nothing behind');
    }
  });
  const catalog = `etcd://${etcd.endpoints.join(',')}`;
  a = await startTestHost({ config: { catalog, host_id: 'host-a', host_ttl_seconds: 2 } });
  const configFile = join(bDir, 'host.toml');
  await writeFile(configFile, [
    `data_dir = ${JSON.stringify(join(bDir, 'data'))}`, 'host_id = "host-b"', `catalog = "${catalog}"`, 'host_ttl_seconds = 2',
    'install_packages = false', 'log_level = "warn"', '[api]', 'host = "127.0.0.1"', 'port = 0',
    '[proxy.http]', 'host = "127.0.0.1"', 'port = 0', '',
  ].join('\n'));
  b = await startHostProcess(configFile, a.host.adminToken);

  // Machines that never launch (skip_launch) are placed like any other: one on each worker.
  await a.client.createApp({ app_name: 'fleet', org_slug: 'personal' });
  const config = { image: '127.0.0.1:1/never-pulled:latest' };
  const m1 = await a.client.createMachine('fleet', { config, skip_launch: true });
  const m2 = await a.client.createMachine('fleet', { config, skip_launch: true });
  const placed = [m1.id, m2.id].map((id) => a!.host.catalog.getMachine(id)?.spec.host_id);
  assert.deepEqual([...placed].sort(), ['host-a', 'host-b']);
  bMachines.push(placed[0] === 'host-b' ? m1.id : m2.id);

  // Both hosts report, and each API shows the whole fleet, both copies caught up.
  for (const client of [a.client, b.client]) {
    const res = await waitFor('both hosts reported and caught up', async () => {
      const r = await client.listHosts();
      return hostIds(r).join() === 'host-a,host-b' && r.hosts.every((h) => h.revision !== null && h.lag === 0) ? r : undefined;
    });
    for (const h of res.hosts) {
      assert.equal(h.machines, 1, `${h.id} runs one machine`);
      assert.ok(h.revision! > 0 && h.revision! <= res.revision + 10, `${h.id} revision ${h.revision} near ${res.revision}`);
      assert.ok(h.staleness_ms! >= 0 && h.last_seen !== null);
      assert.deepEqual(h.roles.sort(), ['api', 'edge', 'worker']);
      assert.ok(h.capacity.cpus > 0 && h.host_number > 0);
    }
  }

  // Reports are not fleet state: with nothing changing, hosts do not keep answering each other's reports.
  const before = a.host.catalog.revision();
  await new Promise((r) => setTimeout(r, 5_000)); // an observation window, not a wait for readiness
  const grew = a.host.catalog.revision() - before;
  assert.ok(grew <= 2, `a quiet fleet wrote ${grew} revisions in 5 s (at most one refresh per host expected)`);

  // The real binary: a table with both hosts, their revisions and lag; --json is the API's answer.
  const env = { TARMAC_API_URL: a.host.apiUrl!, TARMAC_API_TOKEN: a.host.adminToken, NO_COLOR: '1' };
  const table = await tarmac(['status', '--hosts'], env);
  assert.equal(table.code, 0, table.stderr);
  t.diagnostic(table.stdout);
  const lines = table.stdout.trimEnd().split('\n');
  assert.match(lines[0]!, /^HOST\s+REGION\s+ROLES\s+MACHINES\s+CAPACITY\s+REVISION\s+LAG\s+STALE\s+LAST SEEN$/);
  for (const id of ['host-a', 'host-b']) {
    assert.match(lines.find((l) => l.startsWith(id)) ?? '', new RegExp(`^${id}\\s+local\\s+edge,worker,api\\s+1\\s+\\d+ cpu \\d+ MB\\s+\\d+\\s+0\\s+\\S+\\s+\\d+s ago$`));
  }
  const json = await tarmac(['status', '--hosts', '--json'], env);
  assert.equal(json.code, 0, json.stderr);
  assert.deepEqual(hostIds(JSON.parse(json.stdout) as ListHostsResponse), ['host-a', 'host-b']);

  // Admin only: an org token is refused.
  const orgToken = newToken('tm');
  await a.host.catalog.putToken({ hash: hashToken(orgToken), org_slug: 'personal', role: 'org', name: 'deployer', created_at: new Date().toISOString() });
  const orgClient = new TarmacClient({ baseUrl: a.host.apiUrl!, token: orgToken });
  await assert.rejects(orgClient.listHosts(), (e: unknown) => e instanceof ApiError && e.status === 403 && e.code === 'forbidden');
  const refused = await tarmac(['status', '--hosts'], { ...env, TARMAC_API_TOKEN: orgToken });
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /^Error: .*admin token/);

  // Host b dies without a word: its registration (and report) expire with its lease; a stays.
  await b.kill();
  const after = await waitFor('host b to drop out of the fleet', async () => {
    const r = await a!.client.listHosts();
    return hostIds(r).join() === 'host-a' ? r : undefined;
  }, 20_000);
  assert.equal(after.hosts[0]!.lag, 0);
  assert.equal(a.host.catalog.listHosts().length, 1);
});
