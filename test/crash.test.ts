// A host SIGKILLed mid-step (pull, start, stop, destroy, while machines run) converges on its next start: nothing half-done is left.
import { describe, test, before, after, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, rm, readdir } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { startRegistry, type TestRegistry } from './helpers/registry.ts';
import { buildAndPushImage } from './helpers/images.ts';
import { waitFor } from './helpers/wait.ts';
import {
  startHostProcess, instanceRow, runcContainers, conmonPids, machineDebris, removeDebris, RUNC_ROOT, type HostProcess,
} from './helpers/host-process.ts';
import type { MachineConfig, MachineResponse } from '../src/client/index.ts';

const run = promisify(execFile);

/** A data dir, the hosts started on it and the machines made there; all of it is removed in t.after, pass or fail. */
interface Scene {
  dataDir: string;
  ids: Set<string>;
  host: HostProcess;
  /** SIGKILLs the host and starts a new one on the same data dir. */
  crashAndRestart(beforeRestart?: () => Promise<void>): Promise<HostProcess>;
  /** Stops the host with Ctrl-C (asserting it exits 0, machines running) and starts a new one on the same data dir. */
  stopAndRestart(): Promise<HostProcess>;
  create(app: string, config: MachineConfig): Promise<MachineResponse>;
}

async function scene(t: TestContext): Promise<Scene> {
  const dataDir = await mkdtemp(join(tmpdir(), 'tarmac-crash-'));
  const ids = new Set<string>();
  const hosts: HostProcess[] = [];
  t.after(async () => {
    for (const h of hosts) await h.kill();
    await removeDebris(dataDir, ids);
  });
  const start = async () => {
    const h = await startHostProcess(dataDir, { logLevel: process.env['TARMAC_TEST_LOG_LEVEL'] ?? 'warn' });
    hosts.push(h);
    return h;
  };
  const s: Scene = {
    dataDir,
    ids,
    host: await start(),
    async crashAndRestart(beforeRestart) {
      await s.host.kill();
      await beforeRestart?.();
      s.host = await start();
      return s.host;
    },
    async stopAndRestart() {
      // Machines keep running: nothing of theirs (watchers, timers, log readers) may keep the host process alive.
      assert.equal(await s.host.stop(), 0, 'Ctrl-C ends the host while its machines keep running');
      s.host = await start();
      return s.host;
    },
    async create(app, config) {
      const m = await s.host.client.createMachine(app, { config });
      ids.add(m.id);
      return m;
    },
  };
  return s;
}

async function state(s: Scene, app: string, id: string): Promise<string> {
  const all = await s.host.client.listMachines(app, { include_deleted: true });
  return all.find((m) => m.id === id)?.state ?? 'gone';
}

/** Waits for the machine's local step, polling the host's own SQLite: the moment to pull the plug. */
function atStep(s: Scene, id: string, steps: string[]): Promise<string> {
  return waitFor(`machine ${id} at step ${steps.join('/')}`, () => {
    const row = instanceRow(s.dataDir, id);
    return row && steps.includes(row.step) ? row.step : undefined;
  }, 60_000);
}

/**
 * Waits until the machine has converged to `want` and checks that everything agrees: the API's state, the host's
 * instance row, the runtime (exactly one running container and one monitor for a started machine, none otherwise) and,
 * once destroyed, no namespace, mount or cgroup.
 */
async function converged(s: Scene, app: string, m: { id: string; instance_id: string }, want: 'started' | 'stopped' | 'destroyed'): Promise<void> {
  const mismatch = async (): Promise<string | undefined> => {
    const st = await state(s, app, m.id);
    if (st !== want && !(want === 'destroyed' && st === 'gone')) return `state ${st}`;
    const row = instanceRow(s.dataDir, m.id);
    const containers = (await runcContainers()).filter((c) => c.id === m.id);
    const monitors = await conmonPids(m.id);
    if (want === 'started') {
      if (row?.step !== 'running' || row.instance_id !== m.instance_id) return `instance row ${JSON.stringify(row)}`;
      if (containers.length !== 1 || containers[0]!.status !== 'running') return `containers ${JSON.stringify(containers)}`;
      if (monitors.length !== 1) return `conmon processes ${monitors.join(', ')}`;
      return undefined;
    }
    if (want === 'stopped' && row && row.step !== 'exited') return `instance row ${JSON.stringify(row)}`;
    if (want === 'destroyed' && row) return `instance row ${JSON.stringify(row)}`;
    if (containers.length > 0) return `containers ${JSON.stringify(containers)}`;
    if (monitors.length > 0) return `conmon processes ${monitors.join(', ')}`;
    if (want === 'destroyed') {
      const debris = await machineDebris(s.dataDir, [m.id]);
      if (debris.length > 0) return `left behind: ${debris.join(', ')}`;
    }
    return undefined;
  };
  let last: string | undefined;
  try {
    await waitFor(`machine ${m.id} to be ${want}`, async () => (last = await mismatch()) === undefined, 60_000);
  } catch (e) {
    assert.fail(`machine ${m.id} did not converge to ${want}: ${last}\n--- host stderr ---\n${s.host.stderr().slice(-4000)}`);
  }
}

async function destroyAllAndCheck(s: Scene, app: string): Promise<void> {
  await s.host.client.deleteApp(app);
  await waitFor('every machine to be removed', async () => (await machineDebris(s.dataDir, s.ids)).length === 0 && [...s.ids].every((id) => !instanceRow(s.dataDir, id)), 60_000)
    .catch(async () => assert.fail(`left behind: ${(await machineDebris(s.dataDir, s.ids)).join(', ')}\n${s.host.stderr().slice(-4000)}`));
  assert.deepEqual(await readdir(join(s.dataDir, 'machines')), [], 'no machine directory is left');
}

async function exitInside(id: string): Promise<void> {
  await run('runc', ['--root', RUNC_ROOT, 'exec', id, '/bin/sh', '-c', ': > /tmp/exit-now']);
}

describe('a host that crashes mid-step', () => {
  let registry: TestRegistry;
  /** Waits for /tmp/exit-now, then exits 7; SIGINT ends it. */
  let idle: string;
  /** Ignores SIGINT and SIGTERM: only SIGKILL stops it. */
  let stubborn: string;
  /** Idle with a 24 MB layer, so that a pull takes a moment. */
  let big: string;

  before(async () => {
    registry = await startRegistry();
    const idleCmd = ['sh', '-c', 'while [ ! -e /tmp/exit-now ]; do sleep 0.2; done; exit 7'];
    [idle, stubborn, big] = await Promise.all([
      buildAndPushImage(registry.host, 'idle', { cmd: idleCmd }),
      buildAndPushImage(registry.host, 'stubborn', { cmd: ['sh', '-c', 'trap "" INT TERM; while :; do sleep 0.2; done'] }),
      buildAndPushImage(registry.host, 'big', { cmd: idleCmd, extraLayers: [{ files: { 'data/blob': randomBytes(18 << 20).toString('base64') } }] }),
    ]);
  });
  after(async () => {
    await registry?.stop();
  });

  test('killed while pulling and while the driver starts: the machine starts once on the next start', async (t) => {
    const s = await scene(t);
    await s.host.client.createApp({ app_name: 'pull', org_slug: 'personal' });
    const a = await s.create('pull', { image: big });
    await atStep(s, a.id, ['pulling']);
    await s.crashAndRestart();
    await converged(s, 'pull', a, 'started');

    // The image is cached now: kill while the driver is starting the second machine (conmon, runc create/start).
    const b = await s.create('pull', { image: big });
    await atStep(s, b.id, ['starting', 'running']); // 'running' only if the poll missed the moment: then it is a reattach
    await s.crashAndRestart();
    await converged(s, 'pull', b, 'started');
    await converged(s, 'pull', a, 'started');
    const events = await s.host.client.listEvents('pull', b.id);
    assert.equal(events.filter((e) => e.type === 'exit').length, 0, 'a rolled-back start is not an exit of the machine');
    await destroyAllAndCheck(s, 'pull');
  });

  test('killed mid-stop and mid-destroy: the stop resumes with its deadline, the destroy finishes', async (t) => {
    const s = await scene(t);
    await s.host.client.createApp({ app_name: 'halt', org_slug: 'personal' });
    const cfg: MachineConfig = { image: stubborn, stop_config: { timeout: '10s' } };
    const [stopped, destroyed, interrupted] = await Promise.all([s.create('halt', cfg), s.create('halt', cfg), s.create('halt', cfg)]);
    for (const m of [stopped, destroyed, interrupted]) await converged(s, 'halt', m, 'started');

    await s.host.client.stopMachine('halt', stopped.id);
    await s.host.client.stopMachine('halt', interrupted.id);
    await s.host.client.deleteMachine('halt', destroyed.id, { force: true });
    await Promise.all([atStep(s, stopped.id, ['stopping']), atStep(s, interrupted.id, ['stopping']), atStep(s, destroyed.id, ['removing'])]);
    await s.crashAndRestart(async () => {
      const running = (await runcContainers()).filter((c) => c.status === 'running').map((c) => c.id);
      for (const m of [stopped, destroyed, interrupted]) assert.ok(running.includes(m.id), `${m.id} still runs while the host is down`);
    });
    // A destroy while the resumed stop waits out its grace: it does not wait for it.
    await s.host.client.deleteMachine('halt', interrupted.id, { force: true });
    await converged(s, 'halt', destroyed, 'destroyed');
    await converged(s, 'halt', interrupted, 'destroyed');
    await converged(s, 'halt', stopped, 'stopped');
    const exit = (await s.host.client.listEvents('halt', stopped.id)).find((e) => e.type === 'exit');
    const exitEvent = exit?.request?.['exit_event'] as { requested_stop: boolean; exit_code: number } | undefined;
    assert.equal(exitEvent?.requested_stop, true, 'the exit is the stop that was asked for');
    assert.equal(exitEvent?.exit_code, 137, 'it ignored the signal, so the grace ran out and SIGKILL ended it');
    await destroyAllAndCheck(s, 'halt');
  });

  test('a restart reattaches to running machines; one that exited meanwhile restarts by policy or stays stopped', async (t) => {
    const s = await scene(t);
    await s.host.client.createApp({ app_name: 'keep', org_slug: 'personal' });
    const [steady, always, never] = await Promise.all([
      s.create('keep', { image: idle }),
      s.create('keep', { image: idle, restart: { policy: 'always' } }),
      s.create('keep', { image: idle, restart: { policy: 'no' } }),
    ]);
    for (const m of [steady, always, never]) await converged(s, 'keep', m, 'started');
    const pidBefore = (await runcContainers()).find((c) => c.id === steady.id)?.pid;

    await s.crashAndRestart(async () => {
      await Promise.all([exitInside(always.id), exitInside(never.id)]);
      await waitFor('both machines to exit while the host is down', async () => {
        const c = await runcContainers();
        return [always.id, never.id].every((id) => c.find((x) => x.id === id)?.status === 'stopped');
      });
    });
    await converged(s, 'keep', steady, 'started');
    await converged(s, 'keep', never, 'stopped');
    await converged(s, 'keep', always, 'started');
    assert.equal((await runcContainers()).find((c) => c.id === steady.id)?.pid, pidBefore, 'the same process: reattached, not restarted');
    assert.equal((await s.host.client.listEvents('keep', steady.id)).filter((e) => e.type === 'exit').length, 0);

    const exits = async (id: string) => (await s.host.client.listEvents('keep', id)).filter((e) => e.type === 'exit')
      .map((e) => e.request?.['exit_event'] as { exit_code: number; restarting: boolean; requested_stop: boolean });
    assert.deepEqual((await exits(always.id)).map((e) => [e.exit_code, e.restarting]), [[7, true]]);
    assert.deepEqual((await exits(never.id)).map((e) => [e.exit_code, e.restarting, e.requested_stop]), [[7, false, false]]);
    assert.equal((await s.host.client.getMachine('keep', always.id)).instance_id, always.instance_id, 'a policy restart keeps the instance');

    // A second crash with nothing in flight changes nothing; nor does a graceful stop and start.
    await s.crashAndRestart();
    for (const m of [steady, always]) await converged(s, 'keep', m, 'started');
    await converged(s, 'keep', never, 'stopped');
    await s.stopAndRestart();
    for (const m of [steady, always]) await converged(s, 'keep', m, 'started');
    assert.equal((await runcContainers()).find((c) => c.id === steady.id)?.pid, pidBefore, 'reattached after a graceful stop too');
    await destroyAllAndCheck(s, 'keep');
  });

  test('lost local state: the orphaned instance is removed and the machine runs once again', async (t) => {
    const s = await scene(t);
    await s.host.client.createApp({ app_name: 'lost', org_slug: 'personal' });
    const m = await s.create('lost', { image: idle });
    await converged(s, 'lost', m, 'started');
    const pidBefore = (await runcContainers()).find((c) => c.id === m.id)?.pid;
    await s.crashAndRestart(async () => {
      for (const f of ['orchestrator.sqlite', 'orchestrator.sqlite-wal', 'orchestrator.sqlite-shm']) await rm(join(s.dataDir, f), { force: true });
    });
    await converged(s, 'lost', m, 'started');
    assert.notEqual((await runcContainers()).find((c) => c.id === m.id)?.pid, pidBefore, 'the orphan was replaced by an instance the host records');
    await destroyAllAndCheck(s, 'lost');
  });
});
