// End to end on one host: registry images deployed through the Machines API, served through the proxy.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'undici';
import { startRegistry, type TestRegistry } from './helpers/registry.ts';
import { buildAndPushImage, httpImage } from './helpers/images.ts';
import { startTestHost, type TestHost } from './helpers/host.ts';
import { waitFor } from './helpers/wait.ts';
import type { MachineConfig } from '../src/client/index.ts';

const web = (image: string, extra: Partial<MachineConfig> = {}): MachineConfig => ({
  image,
  services: [{ protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }] }],
  ...extra,
});

async function get(h: TestHost, app: string, path = '/'): Promise<{ status: number; body: string }> {
  const res = await request(`${h.proxyUrl}${path}`, { headers: { host: `${app}.localhost` } });
  return { status: res.statusCode, body: (await res.body.text()).trim() };
}

describe('single host', () => {
  let registry: TestRegistry;
  let h: TestHost;
  let httpRef: string;

  before(async () => {
    registry = await startRegistry();
    httpRef = await httpImage(registry.host);
    h = await startTestHost();
  });
  after(async () => {
    await h?.close(); // fails when any machine left a container, monitor, namespace, mount or cgroup behind
    await registry?.stop();
  });

  test('three machines from a registry image all serve through the proxy; stop and start', async () => {
    await h.client.createApp({ app_name: 'web', org_slug: 'personal' });
    const machines = await Promise.all([1, 2, 3].map(() => h.client.createMachine('web', { config: web(httpRef) })));
    for (const m of machines) {
      assert.match(m.id, /^[0-9a-f]{14}$/);
      assert.match(m.instance_id, /^[0-9A-HJKMNP-TV-Z]{26}$/);
      assert.match(m.private_ip, /^fdaa:/);
    }
    await Promise.all(machines.map((m) => h.client.waitMachine('web', m.id, { state: 'started', timeout: 60 })));
    const got = await h.client.getMachine('web', machines[0]!.id);
    assert.equal(got.state, 'started');
    assert.equal(got.image_ref.repository, 'http');
    assert.match(got.image_ref.digest, /^sha256:[0-9a-f]{64}$/);

    // Every machine answers through the proxy (its hostname is its id).
    const seen = new Set<string>();
    await waitFor('all three machines to answer', async () => {
      const r = await get(h, 'web');
      if (r.status === 200) seen.add(r.body);
      return seen.size === 3;
    });
    assert.deepEqual([...seen].sort(), machines.map((m) => m.id).sort());
    const metrics = await (await request(h.host.metricsUrl)).body.text();
    assert.match(metrics, /tarmac_proxy_requests_total\{[^}]*app="web"[^}]*\} [1-9]/, 'the host exports the proxy\'s request counts');
    const cgi = await get(h, 'web', '/cgi-bin/whoami');
    assert.match(cgi.body, /machine_id=[0-9a-f]{14}/);

    // A stopped machine leaves routing; the others keep serving; it comes back on start.
    const [first] = machines;
    await h.client.stopMachine('web', first!.id);
    await h.client.waitMachine('web', first!.id, { state: 'stopped', timeout: 30 });
    for (let i = 0; i < 12; i++) {
      const r = await get(h, 'web');
      assert.equal(r.status, 200);
      assert.notEqual(r.body, first!.id);
    }
    await h.client.startMachine('web', first!.id);
    await h.client.waitMachine('web', first!.id, { state: 'started', timeout: 30 });
    await waitFor('the restarted machine to serve', async () => (await get(h, 'web')).body === first!.id);

    const events = await h.client.listEvents('web', first!.id);
    const exit = events.find((e) => e.type === 'exit');
    assert.equal((exit?.request?.['exit_event'] as { requested_stop: boolean } | undefined)?.requested_stop, true);

    for (const m of machines) await h.client.deleteMachine('web', m.id, { force: true });
    await Promise.all(machines.map((m) => h.client.waitMachine('web', m.id, { state: 'destroyed', timeout: 30 })));
    assert.equal((await get(h, 'web')).status, 503);
    assert.deepEqual(await h.client.listMachines('web'), []);
    assert.equal((await h.client.listMachines('web', { include_deleted: true })).length, 3);
  });

  test('logs are captured with timestamps and the machine knows who it is', async () => {
    const ref = await buildAndPushImage(registry.host, 'hello', { cmd: ['sh', '-c', 'echo "hello from $FLY_MACHINE_ID in $FLY_REGION at $FLY_PRIVATE_IP"; echo oops >&2; exec sleep 600'] });
    await h.client.createApp({ app_name: 'hello', org_slug: 'personal' });
    const m = await h.client.createMachine('hello', { config: { image: ref } });
    await h.client.waitMachine('hello', m.id, { state: 'started', timeout: 60 });
    const lines = await waitFor('both log lines', async () => {
      const out = [];
      for await (const l of h.client.logs('hello')) out.push(l);
      return out.length >= 2 ? out : undefined;
    });
    const out = lines.find((l) => l.stream === 'stdout');
    assert.equal(out?.message, `hello from ${m.id} in local at ${m.private_ip}`);
    assert.ok(!Number.isNaN(Date.parse(out!.timestamp)), 'each line has a timestamp');
    assert.equal(lines.find((l) => l.stream === 'stderr')?.message, 'oops');
    await h.client.deleteApp('hello');
  });

  test('restart policies: on-failure retries up to max_retries, no does not restart', async () => {
    const ref = await buildAndPushImage(registry.host, 'crash', { cmd: ['sh', '-c', 'echo crashing; exit 3'] });
    await h.client.createApp({ app_name: 'crash', org_slug: 'personal' });
    const onFailure = await h.client.createMachine('crash', { config: { image: ref, restart: { policy: 'on-failure', max_retries: 2 } } });
    const never = await h.client.createMachine('crash', { config: { image: ref, restart: { policy: 'no' } } });
    const exits = async (id: string) => (await h.client.listEvents('crash', id)).filter((e) => e.type === 'exit')
      .map((e) => e.request?.['exit_event'] as { exit_code: number; restarting: boolean });
    const a = await waitFor('three exits of the on-failure machine', async () => {
      const e = await exits(onFailure.id);
      return e.length === 3 && (await h.client.getMachine('crash', onFailure.id)).state === 'stopped' ? e : undefined;
    }, 30_000);
    assert.deepEqual(a.map((e) => [e.exit_code, e.restarting]), [[3, false], [3, true], [3, true]], 'newest first: two restarts, then it stays down');
    const b = await waitFor('one exit of the no-restart machine', async () => {
      const e = await exits(never.id);
      return e.length === 1 ? e : undefined;
    });
    assert.equal(b[0]!.restarting, false);
    assert.equal((await h.client.getMachine('crash', never.id)).state, 'stopped');
    await h.client.deleteApp('crash');
  });

  test('a machine over its memory limit is OOM-killed and the event says so', async () => {
    const ref = await buildAndPushImage(registry.host, 'hog', { cmd: ['sh', '-c', 'head -c 300m /dev/zero | tail'] });
    await h.client.createApp({ app_name: 'hog', org_slug: 'personal' });
    const m = await h.client.createMachine('hog', { config: { image: ref, guest: { memory_mb: 32 }, restart: { policy: 'no' } } });
    const exit = await waitFor('the OOM exit', async () => {
      const e = (await h.client.listEvents('hog', m.id)).find((ev) => ev.type === 'exit');
      return e?.request?.['exit_event'] as { oom_killed: boolean; exit_code: number } | undefined;
    }, 30_000);
    assert.equal(exit.oom_killed, true);
    assert.equal(exit.exit_code, 137);
    await h.client.deleteApp('hog');
  });

  test('a host restart reattaches to running machines', async () => {
    await h.client.createApp({ app_name: 'keep', org_slug: 'personal' });
    const m = await h.client.createMachine('keep', { config: web(httpRef) });
    await h.client.waitMachine('keep', m.id, { state: 'started', timeout: 60 });
    await waitFor('the machine to serve', async () => (await get(h, 'keep')).body === m.id);
    await h.stopHostOnly();
    // The machine outlives the host process's components: reach it directly on its private address.
    const direct = await request(`http://[${m.private_ip}]:8080/`);
    assert.equal((await direct.body.text()).trim(), m.id);
    await h.restart();
    await waitFor('the machine to serve after the restart', async () => (await get(h, 'keep')).body === m.id);
    const after = await h.client.getMachine('keep', m.id);
    assert.equal(after.state, 'started');
    assert.equal(after.instance_id, m.instance_id, 'the same instance, not a new one');
    assert.equal((await h.client.listEvents('keep', m.id)).filter((e) => e.type === 'exit').length, 0, 'it never stopped');
    await h.client.stopMachine('keep', m.id, { timeout: 5 });
    await h.client.waitMachine('keep', m.id, { state: 'stopped', timeout: 30 });
    await h.client.deleteApp('keep');
  });

  test('a host whose proxy runs as two worker processes serves machines the same way', async (t) => {
    const h2 = await startTestHost({ config: { proxy: { http: { host: '127.0.0.1', port: 0 }, workers: 2 } } });
    t.after(() => h2.close());
    await h2.client.createApp({ app_name: 'multi', org_slug: 'personal' });
    const m = await h2.client.createMachine('multi', { config: web(httpRef) });
    await h2.client.waitMachine('multi', m.id, { state: 'started', timeout: 60 });
    await waitFor('a proxy worker to serve the machine', async () => (await get(h2, 'multi')).body === m.id);
    for (let i = 0; i < 6; i++) assert.deepEqual(await get(h2, 'multi'), { status: 200, body: m.id });
  });
});
