// HaproxyProcess against the real haproxy binary: start, hitless reload, rejected configs, restart after a crash, close.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, request, type ServerResponse } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { silentLogger } from '../../shared/log.ts';
import { waitFor } from '../../../test/helpers/wait.ts';
import { freePort } from '../../../test/helpers/registry.ts';
import { haproxyBinary, HaproxyProcess, parseStatCsv, type HaproxyProcessOptions } from './process.ts';

const skip = existsSync(haproxyBinary) ? false : `${haproxyBinary} is not installed`;

interface Fixture {
  dir: string;
  port: number;
  opts: HaproxyProcessOptions;
  /** Writes the config answering `body` (and /slow from `backendPort`, when given). */
  write(body: string, extra?: string): Promise<void>;
  /** Runs `cleanup` after the test, before the temp dir is removed (last deferred first). */
  defer(cleanup: () => unknown): void;
}

async function fixture(t: TestContext, backendPort?: number): Promise<Fixture> {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-haproxy-'));
  const cleanups: Array<() => unknown> = [];
  t.after(async () => {
    for (const cleanup of cleanups.reverse()) await cleanup();
    await rm(dir, { recursive: true, force: true });
  });
  const port = await freePort();
  const adminSocket = join(dir, 'admin.sock');
  const configPath = join(dir, 'haproxy.cfg');
  const write = (body: string, extra = '') => writeFile(configPath, [
    'global',
    `  stats socket ${adminSocket} mode 600 level admin expose-fd listeners`,
    'defaults',
    '  mode http',
    '  timeout connect 5s',
    '  timeout client 30s',
    '  timeout server 30s',
    'frontend web',
    `  bind 127.0.0.1:${port}`,
    extra,
    ...(backendPort === undefined ? [] : ['  use_backend slow if { path /slow }']),
    `  http-request return status 200 content-type text/plain string "${body}" if !{ path /slow }`,
    ...(backendPort === undefined ? [] : ['backend slow', `  server s1 127.0.0.1:${backendPort}`]),
    '',
  ].join('\n'));
  await write('v1');
  return { dir, port, write, defer: (cleanup) => { cleanups.push(cleanup); }, opts: { configPath, stateDir: join(dir, 'state'), adminSocket, log: silentLogger() } };
}

async function started(t: TestContext, f: Fixture, extra: Partial<HaproxyProcessOptions> = {}): Promise<HaproxyProcess> {
  const p = await HaproxyProcess.start({ ...f.opts, ...extra });
  f.defer(() => p.close(0));
  return p;
}

/** One request on its own connection. */
function get(port: number, path = '/'): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => { body += d; });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
}

async function workerPid(p: HaproxyProcess): Promise<number> {
  return Number(/^Pid: (\d+)$/m.exec(await p.command('show info'))?.[1]);
}

/** Live (not zombie) processes whose command line names `configPath`. */
async function processesOf(configPath: string): Promise<number[]> {
  const pids: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const cmdline = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    const stat = await readFile(`/proc/${name}/stat`, 'utf8').catch(() => '');
    if (cmdline.split('\0').includes(configPath) && stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z') pids.push(Number(name));
  }
  return pids;
}

test('serves the config, answers runtime API commands and stats', { skip }, async (t) => {
  const f = await fixture(t);
  const p = await started(t, f);
  assert.deepEqual(await get(f.port), { status: 200, body: 'v1' });
  assert.ok(p.pid);
  assert.match(await p.command('show info'), /^Name: HAProxy$/m);
  const rows = await p.stats();
  const web = rows.find((r) => r['pxname'] === 'web' && r['svname'] === 'FRONTEND');
  assert.ok(web, 'a row for the frontend');
  assert.ok(Number(web['stot']) >= 1);
  assert.ok(Number(web['hrsp_2xx']) >= 1);
  await assert.rejects(p.command('show info\nshow stat'), /single line/);
});

test('reload serves the new config from a new worker without cutting a request in flight', { skip }, async (t) => {
  const waiting: ServerResponse[] = [];
  const backend = createServer((_req, res) => { waiting.push(res); });
  await new Promise<void>((resolve) => backend.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => {
    backend.close(() => resolve());
    backend.closeAllConnections();
  }));
  const backendPort = (backend.address() as { port: number }).port;
  const f = await fixture(t, backendPort);
  const p = await started(t, f);
  const master = p.pid;
  const before = await workerPid(p);

  const slow = get(f.port, '/slow');
  const res = await waitFor('the slow request to reach the backend', () => waiting[0]);
  await f.write('v2');
  await Promise.all([p.reload(), p.reload(), p.reload()]); // coalesced, all resolve once a new worker answers
  assert.notEqual(await workerPid(p), before);
  assert.equal(p.pid, master, 'the master re-executes itself in place');
  assert.deepEqual(await get(f.port), { status: 200, body: 'v2' });

  res.end('slow done');
  assert.deepEqual(await slow, { status: 200, body: 'slow done' });
});

test('a config that fails the check is rejected and the old one keeps serving', { skip }, async (t) => {
  const f = await fixture(t);
  const p = await started(t, f);
  const before = await workerPid(p);
  await f.write('v2', '  http-request frobnicate');
  await assert.rejects(p.check(), /invalid: .*frobnicate/);
  await assert.rejects(p.reload(), (e: Error) => /invalid: .*frobnicate/.test(e.message) && (e as { code?: string }).code === 'invalid_argument');
  assert.equal(await workerPid(p), before);
  assert.deepEqual(await get(f.port), { status: 200, body: 'v1' });
});

test('a config that passes the check but cannot load is rejected and the old worker keeps serving', { skip }, async (t) => {
  const f = await fixture(t);
  const p = await started(t, f);
  const before = await workerPid(p);
  await f.write('v2', '  bind 192.0.2.1:80'); // valid, but not an address of this host: the bind fails at load
  await assert.rejects(p.reload(), /reload failed, the old config keeps serving: .*cannot bind/);
  assert.equal(await workerPid(p), before);
  assert.deepEqual(await get(f.port), { status: 200, body: 'v1' });
  await f.write('v3');
  await p.reload(); // the master recovers from its wait mode
  assert.deepEqual(await get(f.port), { status: 200, body: 'v3' });
});

test('start rejects an invalid config with haproxy\'s message and leaves nothing running', { skip }, async (t) => {
  const f = await fixture(t);
  await f.write('v1', '  http-request frobnicate');
  await assert.rejects(HaproxyProcess.start(f.opts), /invalid: .*frobnicate/);
  await f.write('v1', '  bind 192.0.2.1:80');
  await assert.rejects(HaproxyProcess.start(f.opts), /master exited .*cannot bind/);
  assert.deepEqual(await processesOf(f.opts.configPath), []);
});

test('a master killed with SIGKILL is restarted and serves again', { skip }, async (t) => {
  const f = await fixture(t);
  let restarts = 0;
  const p = await started(t, f, { onRestart: () => { restarts++; } });
  const master = p.pid!;
  process.kill(master, 'SIGKILL');
  await waitFor('onRestart', () => restarts === 1);
  assert.notEqual(p.pid, master);
  assert.deepEqual(await get(f.port), { status: 200, body: 'v1' });
  await f.write('v2');
  await p.reload();
  assert.deepEqual(await get(f.port), { status: 200, body: 'v2' });
});

test('close ends every haproxy process and is idempotent', { skip }, async (t) => {
  const f = await fixture(t);
  const p = await started(t, f);
  const master = p.pid!;
  await f.write('v2');
  await p.reload(); // two generations of workers seen
  assert.ok((await processesOf(f.opts.configPath)).includes(master));
  await Promise.all([p.close(), p.close()]);
  assert.deepEqual(await processesOf(f.opts.configPath), []);
  assert.equal(p.pid, undefined);
  await assert.rejects(p.reload(), /closed/);
  await p.close();
});

test('start stops a master left by an earlier run of the same state dir', { skip }, async (t) => {
  const f = await fixture(t);
  await mkdir(f.opts.stateDir, { recursive: true });
  const stale = spawn(haproxyBinary, ['-W', '-db', '-S', join(f.opts.stateDir, 'master.sock'), '-f', f.opts.configPath], { stdio: 'ignore' });
  f.defer(() => { stale.kill('SIGKILL'); });
  await waitFor('the earlier run to serve', () => get(f.port).then((r) => r.status === 200));
  let gone = false;
  stale.once('exit', () => { gone = true; });
  const p = await started(t, f);
  await waitFor('the earlier run to be stopped', () => gone);
  assert.notEqual(p.pid, stale.pid);
  assert.deepEqual(await processesOf(f.opts.configPath), [p.pid!, await workerPid(p)].sort((x, y) => x - y));
  assert.deepEqual(await get(f.port), { status: 200, body: 'v1' });
});

test('close() right after a crash stops the restart', { skip }, async (t) => {
  const f = await fixture(t);
  let restarts = 0;
  const p = await started(t, f, { onRestart: () => { restarts++; } });
  process.kill(p.pid!, 'SIGKILL');
  await waitFor('the crash to be seen', () => p.pid === undefined);
  await p.close();
  assert.deepEqual(await processesOf(f.opts.configPath), []);
  assert.equal(restarts, 0);
});

test('haproxy dies with the process that started it, even when that one is killed', { skip }, async (t) => {
  const f = await fixture(t);
  const code = `
    import { silentLogger } from ${JSON.stringify(new URL('../../shared/log.ts', import.meta.url).pathname)};
    import { HaproxyProcess } from ${JSON.stringify(new URL('./process.ts', import.meta.url).pathname)};
    const p = await HaproxyProcess.start({ ...${JSON.stringify({ ...f.opts, log: undefined })}, log: silentLogger() });
    console.log(JSON.stringify({ pid: p.pid }));
    setInterval(() => {}, 1000);`;
  const parent = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], { stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = new Promise<void>((resolve) => parent.once('exit', () => resolve()));
  f.defer(async () => {
    if (parent.exitCode === null && parent.signalCode === null) parent.kill('SIGKILL');
    await exited;
  });
  const line = await new Promise<string>((resolve, reject) => {
    parent.stdout.setEncoding('utf8').once('data', (d: string) => resolve(d));
    parent.once('exit', () => reject(new Error('the parent exited before starting haproxy')));
  });
  const master = (JSON.parse(line) as { pid: number }).pid;
  assert.ok((await processesOf(f.opts.configPath)).includes(master));
  parent.kill('SIGKILL');
  await exited;
  await waitFor('haproxy to die with its parent', async () => (await processesOf(f.opts.configPath)).length === 0, 10_000);
});

test('parseStatCsv keys rows by column and reads quoted fields', () => {
  const rows = parseStatCsv('# pxname,svname,scur,check_desc,\nweb,FRONTEND,3,,\nbe,s1,0,"a, ""b""",\n\n');
  assert.deepEqual(rows, [
    { pxname: 'web', svname: 'FRONTEND', scur: '3', check_desc: '' },
    { pxname: 'be', svname: 's1', scur: '0', check_desc: 'a, "b"' },
  ]);
});
