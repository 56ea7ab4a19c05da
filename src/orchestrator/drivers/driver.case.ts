// The driver conformance suite: every Driver implementation runs it against a real runtime, netns and busybox image.
import { test, describe, before, after, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, readFile, readdir, symlink, access } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { get } from 'node:http';
import type { Driver, RunSpec, RunningMachine } from '../driver.ts';
import { setupMachineNetwork, teardownMachineNetwork } from '../network.ts';
import { makeBusyboxRootfs } from '../../../test/helpers/rootfs.ts';

export interface ConformanceOptions {
  /** Why the suite cannot run here, if it cannot (the tests are then skipped with this reason). */
  skip?: string | undefined;
  /** True while the runtime still keeps state for container `id` (checked after remove). */
  runtimeHasState?: (id: string) => Promise<boolean>;
  /** Cgroup directories a machine's limits live in (checked after remove). */
  cgroupDirs?: (id: string) => string[];
}

const LOG_LINE = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) (stdout|stderr) [FP] (.*)$/;

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}

/** Log lines as [stream, text] pairs. */
async function logLines(path: string): Promise<[string, string][]> {
  const text = await readFile(path, 'utf8').catch(() => '');
  return text
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => {
      const m = LOG_LINE.exec(l);
      assert.ok(m, `log line without timestamp and stream: ${JSON.stringify(l)}`);
      return [m[2] ?? '', m[3] ?? ''];
    });
}

/** Polls `cond` until it returns a value, or fails after `timeoutMs`. */
async function until<T>(what: string, cond: () => Promise<T | undefined | false>, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await cond();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function waitForLog(path: string, re: RegExp, timeoutMs = 10_000): Promise<void> {
  await until(`log line ${re}`, async () => (await logLines(path)).some(([, l]) => re.test(l)), timeoutMs);
}

/** Pids of processes whose command line mentions `needle` (leftover monitors). */
async function processesMentioning(needle: string): Promise<number[]> {
  const found: number[] = [];
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
    const cmd = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (cmd.includes(needle)) found.push(Number(pid));
  }
  return found;
}

/** GET on a fresh connection (busybox httpd closes each one: no keep-alive reuse races); undefined unless 200. */
function httpGet(url: string, timeoutMs = 1000): Promise<string | undefined> {
  return new Promise((resolve) => {
    const req = get(url, { agent: false, timeout: timeoutMs }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (d: string) => (body += d));
      res.on('end', () => resolve(res.statusCode === 200 ? body : undefined));
      res.on('error', () => resolve(undefined));
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(undefined));
  });
}

let addressCounter = 0;

/** The shared suite. `makeDriver` is called once per "host process": recover tests make a second one. */
export function runDriverConformance(name: string, makeDriver: () => Driver, opts: ConformanceOptions = {}): void {
  describe(`driver conformance: ${name}`, { skip: opts.skip ?? false }, () => {
    let work = '';
    let image = '';
    let driver: Driver;
    const page = 'hello from tarmac\n';

    before(async () => {
      work = await mkdtemp(join(tmpdir(), `tarmac-driver-${name}-`));
      image = await makeBusyboxRootfs(join(work, 'image'), {
        'var/www/index.html': page,
        'var/www/cgi-bin/host': '#!/bin/sh\nprintf \'Content-Type: text/plain\\r\\n\\r\\n\'\nhostname\n',
      });
      for (const applet of ['unshare', 'mount']) await symlink('busybox', join(image, 'bin', applet)).catch(() => {});
      driver = makeDriver();
    });
    after(async () => {
      if (work) await rm(work, { recursive: true, force: true });
    });

    interface Launched {
      spec: RunSpec;
      machine: RunningMachine;
      address: string;
      startMs: number;
    }

    /** Sets up a netns and starts a machine; everything is undone after the test, even on failure. */
    async function launch(t: TestContext, args: string[], over: Partial<RunSpec> = {}, d: Driver = driver): Promise<Launched> {
      const id = randomBytes(7).toString('hex');
      const address = `fdaa:0:7e57:0:${process.pid.toString(16)}:0:${(++addressCounter).toString(16)}:2`;
      const dir = join(work, id);
      t.after(async () => {
        await d.remove(id, join(dir, 'state'));
        await teardownMachineNetwork(id);
      });
      const net = await setupMachineNetwork(id, address);
      const spec: RunSpec = {
        id,
        instanceId: `inst-${id}`,
        imageRootfs: image,
        stateDir: join(dir, 'state'),
        args,
        env: { PATH: '/bin', TARMAC_TEST: 'yes', FLY_MACHINE_ID: id },
        cwd: '/',
        user: '',
        hostname: id,
        netnsPath: net.netnsPath,
        hosts: `127.0.0.1\tlocalhost\n::1\tlocalhost\n${address}\t${id}\n`,
        limits: { cpus: 1, memoryMb: 64, pids: 64 },
        logPath: join(dir, 'logs', 'machine.log'),
        ...over,
      };
      const t0 = performance.now();
      const machine = await d.start(spec);
      return { spec, machine, address, startMs: performance.now() - t0 };
    }

    test('stdout and stderr land in the log with timestamps; env, hostname and exit code are right', async (t) => {
      const { spec, machine } = await launch(t, ['sh', '-c', 'echo out; echo err >&2; echo "env=$TARMAC_TEST"; hostname; cat /etc/hostname; grep -c localhost /etc/hosts; exit 7']);
      const status = await machine.exited;
      assert.equal(status.code, 7);
      assert.equal(status.signal, 0);
      assert.equal(status.oomKilled, false);
      assert.ok(status.exitedAt instanceof Date);
      const lines = await logLines(spec.logPath);
      assert.deepEqual(lines.filter(([s]) => s === 'stderr').map(([, l]) => l), ['err']);
      assert.deepEqual(lines.filter(([s]) => s === 'stdout').map(([, l]) => l), ['out', 'env=yes', spec.id, spec.id, '2']);
    });

    test('stop with SIGTERM ends a process without a handler (an init forwards it)', async (t) => {
      // Wait until the process runs: a signal that reaches the init before it has set up its handlers is lost.
      const { spec, machine } = await launch(t, ['sh', '-c', 'echo ready; exec sleep 1000']);
      assert.ok(machine.pid > 0);
      await waitForLog(spec.logPath, /^ready$/);
      const status = await machine.stop('SIGTERM', 10_000);
      assert.equal(status.code, 143, 'stopped by SIGTERM (143), not by the SIGKILL after the timeout (137)');
      assert.equal(status.signal, 15);
    });

    test('stop sends SIGKILL after the timeout to a process that ignores SIGTERM', async (t) => {
      const { spec, machine } = await launch(t, ['sh', '-c', 'trap "" TERM; echo ready; while true; do sleep 1; done']);
      await waitForLog(spec.logPath, /^ready$/);
      const t0 = Date.now();
      const status = await machine.stop('SIGTERM', 400);
      assert.ok(Date.now() - t0 >= 390, 'waited for the timeout');
      assert.equal(status.code, 137);
      assert.equal(status.signal, 9);
    });

    test('kill delivers a signal to the machine process', async (t) => {
      const { spec, machine } = await launch(t, ['sh', '-c', 'trap "echo got-usr1; exit 3" USR1; echo ready; while true; do sleep 0.1; done']);
      await waitForLog(spec.logPath, /^ready$/);
      await machine.kill('SIGUSR1');
      const status = await machine.exited;
      assert.equal(status.code, 3);
      await waitForLog(spec.logPath, /^got-usr1$/);
    });

    test('memory limit: a machine that outgrows it is OOM-killed and that is recorded', async (t) => {
      const { machine } = await launch(t, ['sh', '-c', 'head -c 400m /dev/zero | tail; echo survived'], { limits: { cpus: 1, memoryMb: 32, pids: 64 } });
      const status = await machine.exited;
      assert.equal(status.oomKilled, true, `exit ${JSON.stringify(status)}`);
    });

    test('pids limit: forking past it fails', async (t) => {
      const { spec, machine } = await launch(t, ['sh', '-c', 'for i in $(seq 1 200); do sleep 30 & done; echo forked-all'], { limits: { cpus: 1, memoryMb: 64, pids: 20 } });
      await until('fork failure or the end of the loop', async () => {
        const lines = await logLines(spec.logPath);
        return lines.some(([, l]) => /can't fork|Resource temporarily unavailable|forked-all/.test(l));
      });
      const lines = (await logLines(spec.logPath)).map(([, l]) => l);
      assert.ok(lines.some((l) => /can't fork|Resource temporarily unavailable/.test(l)), `no fork failure in ${JSON.stringify(lines)}`);
      assert.ok(!lines.includes('forked-all'));
      await machine.stop('SIGKILL', 0);
    });

    test('a denied syscall fails with permission denied', async (t) => {
      const { spec, machine } = await launch(t, ['sh', '-c', 'unshare -U true; echo "unshare=$?"; mkdir -p /mnt; mount -t tmpfs none /mnt; echo "mount=$?"']);
      const status = await machine.exited;
      assert.equal(status.code, 0);
      const lines = (await logLines(spec.logPath)).map(([, l]) => l);
      assert.ok(lines.includes('unshare=1'), JSON.stringify(lines));
      assert.ok(lines.some((l) => /unshare.*(not permitted|Permission denied)/i.test(l)), JSON.stringify(lines));
      assert.ok(!lines.includes('mount=0'), JSON.stringify(lines));
    });

    test('the machine answers HTTP on its IPv6 address from the host; start latency', async (t) => {
      const runs: { log: number; http: number }[] = [];
      for (let i = 0; i < 3; i++) {
        const t0 = performance.now();
        const { spec, address } = await launch(t, ['sh', '-c', 'echo up; exec httpd -f -p 8080 -h /var/www']);
        await waitForLog(spec.logPath, /^up$/);
        const firstLog = performance.now() - t0;
        const body = await until('HTTP answer', () => httpGet(`http://[${address}]:8080/cgi-bin/host`));
        runs.push({ log: Math.round(firstLog), http: Math.round(performance.now() - t0) });
        assert.equal(body.trim(), spec.id);
        assert.equal(await until('index page', () => httpGet(`http://[${address}]:8080/`)), page);
      }
      t.diagnostic(`${name} start → first log line / → HTTP answering (ms): ${runs.map((r) => `${r.log}/${r.http}`).join(', ')}`);
    });

    test('recover after a host restart: reattach to a running machine, report one that exited meanwhile', async (t) => {
      const running = await launch(t, ['sh', '-c', 'echo ready; exec sleep 1000']);
      const ended = await launch(t, ['sh', '-c', 'echo bye; exit 5']);
      await waitForLog(running.spec.logPath, /^ready$/);
      assert.equal((await ended.machine.exited).code, 5);

      const restarted = makeDriver();
      const again = await restarted.recover(running.spec.id, running.spec.stateDir);
      assert.ok(again && 'stop' in again, 'reattached to the running machine');
      assert.equal(again.pid, running.machine.pid);
      const status = await again.stop('SIGTERM', 5000);
      assert.equal(status.code, 143);
      // Logs kept flowing to the same file through the restart.
      await waitForLog(running.spec.logPath, /^ready$/);

      const gone = await restarted.recover(ended.spec.id, ended.spec.stateDir);
      assert.ok(gone && !('stop' in gone), 'reported as exited');
      assert.equal(gone.exited.code, 5);
      assert.equal(gone.exited.oomKilled, false);

      assert.equal(await restarted.recover('00000000000000', join(work, 'nothing-here')), undefined);
    });

    test('remove leaves no mounts, runtime state, monitor, cgroup or namespace behind, and is idempotent', async (t) => {
      const { spec, machine } = await launch(t, ['sleep', '1000']);
      await driver.remove(spec.id, spec.stateDir);
      const status = await machine.exited;
      assert.ok(status.code !== 0, 'exited resolves when the machine is removed');
      await driver.remove(spec.id, spec.stateDir);
      await teardownMachineNetwork(spec.id);
      await teardownMachineNetwork(spec.id);
      const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
      assert.ok(!mountinfo.includes(spec.stateDir), 'no mount left under the state dir');
      assert.equal(await exists(spec.stateDir), false);
      if (opts.runtimeHasState) assert.equal(await opts.runtimeHasState(spec.id), false, 'runtime state removed');
      for (const dir of opts.cgroupDirs?.(spec.id) ?? []) assert.equal(await exists(dir), false, `${dir} removed`);
      assert.deepEqual(await processesMentioning(spec.id), [], 'no monitor or runtime process left');
      assert.equal(await exists(`/var/run/netns/tm-${spec.id.slice(0, 12)}`), false, 'namespace removed');
      assert.ok((await readFile(spec.logPath, 'utf8').catch(() => '')) !== undefined);
    });
  });
}
