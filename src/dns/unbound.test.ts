// The unbound engine's own duties, against a real unbound: restarting it when it dies, a view for an org created later, no process left behind.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { Writable } from 'node:stream';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { machineAddress, openSqliteCatalog, type Catalog } from '../catalog/index.ts';
import { createLogger, silentLogger } from '../shared/log.ts';
import { waitFor } from '../../test/helpers/wait.ts';
import { startDns, startUnboundDns, type RunningDns } from './index.ts';
import { dig, writeFleet } from './testing.ts';

const whyNot = (() => {
  if (!existsSync('/usr/sbin/unbound')) return 'unbound not installed (apt-get install unbound)';
  try {
    execFileSync('dig', ['-v'], { stdio: 'ignore' });
  } catch {
    return 'dig not installed (apt-get install bind9-dnsutils)';
  }
  return false;
})();

/** Processes whose command line names the config in `stateDir` (an unbound of that server). */
async function unboundsOf(stateDir: string): Promise<number[]> {
  const out: number[] = [];
  for (const p of await readdir('/proc')) {
    if (!/^\d+$/.test(p) || Number(p) === process.pid) continue;
    const cmdline = await readFile(`/proc/${p}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.split('\0').includes(join(stateDir, 'unbound.conf')) && alive(Number(p))) out.push(Number(p));
  }
  return out;
}

const alive = (pid: number) => existsSync(`/proc/${pid}`) && !/^State:\s+Z/m.test(readProcStatus(pid));
function readProcStatus(pid: number): string {
  try {
    return execFileSync('cat', [`/proc/${pid}/status`], { encoding: 'utf8' });
  } catch {
    return '';
  }
}

describe('unbound engine', { skip: whyNot }, () => {
  let dir: string;
  let catalog: Catalog;
  let ips: Map<string, string>;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tarmac-unbound-'));
    catalog = openSqliteCatalog(join(dir, 'catalog.sqlite'));
    ips = await writeFleet(catalog, {
      orgs: [{ slug: 'personal', network: 1 }],
      hosts: [{ id: 'h1', region: 'ams', number: 1 }],
      apps: [{ name: 'web', org: 'personal' }],
      machines: [{ id: 'w1', app: 'web', host: 'h1', region: 'ams', hostNumber: 1, number: 1, state: 'started' }],
    });
  });
  after(async () => {
    await catalog?.close();
    await rm(dir, { recursive: true, force: true });
  });

  const start = (name: string, listen = { host: '127.0.0.1', port: 0 }): Promise<RunningDns> => startUnboundDns({
    catalog, listen: [listen], upstreams: [], trusted: ['127.0.0.0/8'], region: 'ams', log: silentLogger(), stateDir: join(dir, name),
  });

  test('unbound killed is started again, with every record, and close leaves no unbound behind', async () => {
    const dns = await start('restart');
    const first = dns.pid()!;
    try {
      assert.equal(dns.engine, 'unbound');
      const at = dns.listening()[0]!;
      assert.deepEqual((await dig(at, 'web.internal', 'AAAA')).answers.map((a) => a.data), [ips.get('w1')]);
      assert.ok((await readFile(join(dir, 'restart', 'unbound.conf'), 'utf8')).includes('view:'), 'the generated config is in the state dir');
      assert.equal((await stat(join(dir, 'restart'))).mode & 0o777, 0o700, 'the state dir (control socket) is root\'s alone');
      assert.equal((await stat(join(dir, 'restart', 'unbound.conf'))).mode & 0o777, 0o600);
      process.kill(first, 'SIGKILL');
      const second = await waitFor('a new unbound', () => { const p = dns.pid(); return p !== undefined && p !== first && p; }, 10_000);
      await waitFor('the new unbound to answer', async () => (await dig(dns.listening()[0] ?? at, 'web.internal', 'AAAA').catch(() => undefined))?.answers.length === 1, 10_000);
      assert.deepEqual(dns.listening(), [at], 'same address and port');
      // Changes made after the restart reach it too.
      await catalog.createApp({ name: 'after', org_slug: 'personal', network: 'default', created_at: new Date().toISOString() });
      await waitFor('after.internal', async () => (await dig(at, 'after.internal', 'AAAA')).status === 'NOERROR', 5000);
      await dns.close();
      await waitFor('unbound to exit', () => !alive(second), 5000);
      assert.equal(dns.pid(), undefined);
      assert.ok(!alive(first));
    } finally {
      await dns.close();
    }
  });

  test('an org created while serving gets its view: its machines see its names and no one else\'s', { skip: process.getuid?.() === 0 ? false : 'needs root to add a private address to lo' }, async () => {
    const late = machineAddress(7, 1, 1);
    execFileSync('ip', ['addr', 'add', `${late}/128`, 'dev', 'lo', 'nodad']);
    const dns = await start('late-org', { host: late, port: 0 });
    try {
      const at = dns.listening()[0]!;
      const from = ['-b', late];
      assert.equal((await dig(at, 'web.internal', 'AAAA', from)).status, 'REFUSED', 'no org has this network yet');
      await writeFleet(catalog, {
        orgs: [{ slug: 'late', network: 7 }], hosts: [], apps: [{ name: 'late-app', org: 'late' }],
        machines: [{ id: 'l1', app: 'late-app', host: 'h1', region: 'ams', hostNumber: 1, number: 1, state: 'started' }],
      });
      const r = await waitFor('late-app.internal from the late org', async () => {
        const d = await dig(at, 'late-app.internal', 'AAAA', from);
        return d.answers.length > 0 && d;
      }, 10_000);
      assert.deepEqual(r.answers.map((a) => a.data), [late]);
      assert.equal((await dig(at, 'web.internal', 'AAAA', from)).status, 'NXDOMAIN', 'another org\'s app does not exist for it');
      assert.deepEqual((await dig(at, '_apps.internal', 'TXT', from)).answers.map((a) => a.data), ['"late-app"']);
      // The machine stops: its names go, the app stays (NODATA).
      await catalog.putMachineStatus({ ...catalog.getMachine('l1')!.status!, state: 'stopped' });
      await waitFor('l1 gone', async () => (await dig(at, 'l1.vm.late-app.internal', 'AAAA', from)).status === 'NXDOMAIN', 5000);
      const app = await dig(at, 'late-app.internal', 'AAAA', from);
      assert.equal(app.status, 'NOERROR');
      assert.equal(app.answers.length, 0);
    } finally {
      await dns.close();
      execFileSync('ip', ['addr', 'del', `${late}/128`, 'dev', 'lo']);
    }
  });

  test('unbound dies with the process that started it, even when that one is killed', async () => {
    const code = `
      import { openSqliteCatalog } from ${JSON.stringify(new URL('../catalog/index.ts', import.meta.url).pathname)};
      import { silentLogger } from ${JSON.stringify(new URL('../shared/log.ts', import.meta.url).pathname)};
      import { startUnboundDns } from ${JSON.stringify(new URL('./index.ts', import.meta.url).pathname)};
      const catalog = openSqliteCatalog(${JSON.stringify(join(dir, 'orphan.sqlite'))});
      const dns = await startUnboundDns({ catalog, listen: [{ host: '127.0.0.1', port: 0 }], upstreams: [], trusted: [],
        region: 'ams', log: silentLogger(), stateDir: ${JSON.stringify(join(dir, 'orphan'))} });
      console.log(JSON.stringify({ pid: dns.pid() }));
      setInterval(() => {}, 1000);`;
    const parent = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], { stdio: ['ignore', 'pipe', 'inherit'] });
    const exited = new Promise<void>((resolve) => parent.once('exit', () => resolve()));
    try {
      const line = await new Promise<string>((resolve, reject) => {
        parent.stdout.setEncoding('utf8').once('data', (d: string) => resolve(d));
        parent.once('exit', () => reject(new Error('the parent exited before starting unbound')));
      });
      const pid = (JSON.parse(line) as { pid: number }).pid;
      assert.ok(alive(pid), 'unbound runs');
      parent.kill('SIGKILL');
      await exited;
      await waitFor('unbound to die with its parent', () => !alive(pid), 10_000);
    } finally {
      if (parent.exitCode === null && parent.signalCode === null) parent.kill('SIGKILL');
      await exited;
    }
  });

  test('close() landing while a restart is starting unbound leaves no unbound behind', async () => {
    let launches = 0;
    let closing: Promise<void> | undefined;
    const stateDir = join(dir, 'close-race');
    const dns: RunningDns = await startUnboundDns({
      catalog, listen: [{ host: '127.0.0.1', port: 0 }], upstreams: [], trusted: ['127.0.0.0/8'], region: 'ams', log: silentLogger(), stateDir,
      // The restart's config is written and unbound about to be spawned: close now.
      testHooks: { beforeSpawn: () => { if (++launches === 2) closing = dns.close(); } },
    });
    try {
      process.kill(dns.pid()!, 'SIGKILL');
      await waitFor('close() during the restart', () => closing !== undefined, 10_000);
      await closing;
      assert.deepEqual(await unboundsOf(stateDir), [], 'no unbound runs the closed server\'s config');
      assert.equal(dns.pid(), undefined);
    } finally {
      await dns.close();
      for (const pid of await unboundsOf(stateDir)) process.kill(pid, 'SIGKILL');
    }
  });

  test('unbound dying during a reload is started again at once, not after the reload\'s timeout', async () => {
    let killed: number | undefined;
    const dns = await startUnboundDns({
      catalog, listen: [{ host: '127.0.0.1', port: 0 }], upstreams: [], trusted: ['127.0.0.0/8'], region: 'ams', log: silentLogger(),
      stateDir: join(dir, 'reload-death'),
      testHooks: { afterReloadSent: (pid) => { if (killed === undefined && pid !== undefined) process.kill((killed = pid), 'SIGKILL'); } },
    });
    try {
      const at = dns.listening()[0]!;
      // A new org changes the views: a config reload, during which unbound dies.
      await writeFleet(catalog, { orgs: [{ slug: 'reloaded', network: 8 }], hosts: [], apps: [{ name: 'reloaded-app', org: 'reloaded' }], machines: [] });
      await waitFor('the reload to be sent', () => killed !== undefined, 10_000);
      const t0 = Date.now();
      await waitFor('a new unbound serving the new app', async () => dns.pid() !== undefined && dns.pid() !== killed
        && (await dig(at, 'reloaded-app.internal', 'AAAA').catch(() => undefined))?.status === 'NOERROR', 10_000);
      const ms = Date.now() - t0;
      assert.ok(ms < 5000, `served again after ${ms} ms (the restart waited for the dead unbound's reload to time out)`);
    } finally {
      await dns.close();
    }
  });

  test('unbound that cannot start: the node engine serves unless unbound was asked for, which fails with the cause and the fix', async () => {
    // An unbound as AppArmor leaves it when the config is outside the directories its profile allows.
    const fake = join(dir, 'denied-unbound');
    await writeFile(fake, '#!/bin/sh\necho "[1700000000] unbound[1:0] error: Could not open $3: Permission denied" >&2\nexit 1\n', { mode: 0o755 });
    const lines: string[] = [];
    const log = createLogger({ level: 'info', destination: new Writable({ write(chunk, _enc, done) { lines.push(String(chunk)); done(); } }) });
    const opts = {
      catalog, listen: [{ host: '127.0.0.1', port: 0 }], upstreams: [], trusted: ['127.0.0.0/8'], region: 'ams', log,
      stateDir: join(dir, 'denied'), unboundBinary: fake,
    };
    const dns = await startDns({ ...opts, engine: undefined });
    try {
      assert.equal(dns.engine, 'node');
      assert.deepEqual((await dig(dns.listening()[0]!, 'web.internal', 'AAAA')).answers.map((a) => a.data), [ips.get('w1')]);
      const fallback = lines.filter((l) => l.includes('serving DNS with the node engine'));
      assert.equal(fallback.length, 1, 'one line says so');
      assert.match(fallback[0]!, /Permission denied/);
    } finally {
      await dns.close();
    }
    await assert.rejects(startDns({ ...opts, engine: 'unbound' }), (e: Error) => {
      assert.match(e.message, /Permission denied/, 'the cause');
      assert.match(e.message, /\/etc\/apparmor\.d\/local\/usr\.sbin\.unbound/, 'the fix');
      assert.ok(e.message.includes(`${join(dir, 'denied')}/** rw,`));
      assert.match(e.message, /dns\.engine = "node"/);
      assert.ok(!e.message.includes('\n'), 'one line');
      return true;
    });
  });

  test('a listen address in use is retried, and served once free', async () => {
    const holder = await start('holder');
    const taken = holder.listening()[0]!;
    const dns = await start('waiter', taken);
    try {
      assert.deepEqual(dns.listening(), [], 'nothing bound while the address is taken');
      assert.equal(dns.pid(), undefined, 'no unbound until it has an address (it would take localhost:53)');
      await holder.close();
      await waitFor('the waiter to take the address', () => dns.listening().length === 1, 10_000);
      assert.equal((await dig(taken, 'web.internal', 'AAAA')).answers.length, 1);
    } finally {
      await holder.close();
      await dns.close();
    }
  });
});
