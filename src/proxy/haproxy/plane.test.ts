// The HAProxy data plane against real parts: HAProxy in front of the Node proxy, a real SQLite catalog, node:http
// servers playing machines.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingHttpHeaders, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { connect, type AddressInfo } from 'node:net';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request } from 'undici';
import type { Catalog } from '../../catalog/index.ts';
import { silentLogger } from '../../shared/log.ts';
import { proxyRequestChannel, type ProxyLimits, type ProxyRequestEvent, type ProxyTimeouts, type RunningProxy } from '../proxy.ts';
import { createApp, haproxyAdmin, httpService, startedMachine, tempCatalog } from '../testing.ts';
import { startHaproxyPlane } from './plane.ts';
import { waitFor } from '../../../test/helpers/wait.ts';

interface Machine { port: number; hits: number; headers: IncomingHttpHeaders[]; raw: string[][]; server: Server }

/** A node:http server on loopback playing a machine; it records the headers it got and answers with its port. */
async function machineServer(t: TestContext, handler?: (req: IncomingMessage, res: ServerResponse) => boolean): Promise<Machine> {
  const m: Machine = { port: 0, hits: 0, headers: [], raw: [], server: undefined as unknown as Server };
  m.server = createServer((req, res) => {
    m.hits++;
    m.headers.push(req.headers);
    m.raw.push(req.rawHeaders);
    if (handler?.(req, res) === true) return;
    res.end(`machine ${m.port}`);
  });
  await new Promise<void>((resolve) => m.server.listen(0, '127.0.0.1', resolve));
  m.port = (m.server.address() as AddressInfo).port;
  t.after(() => new Promise<void>((resolve) => {
    m.server.closeAllConnections();
    m.server.close(() => resolve());
  }));
  return m;
}

async function planeFor(t: TestContext, catalog: Catalog, timeouts: ProxyTimeouts = {}, limits: ProxyLimits = {}): Promise<{ plane: RunningProxy; dir: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-haproxy-'));
  const plane = await startHaproxyPlane({
    catalog, http: { host: '127.0.0.1', port: 0 }, appsDomain: 'localhost', log: silentLogger(), region: 'test-region', timeouts, limits,
    stateDir: dir, threads: 1, autostart: { catalog, start: async () => undefined },
  });
  t.after(async () => {
    await plane.close();
    await rm(dir, { recursive: true, force: true });
  });
  return { plane, dir };
}

/** One runtime API command on the plane's HAProxy. */
function admin(dir: string, command: string): Promise<string> {
  return haproxyAdmin(join(dir, 'admin.sock'), command);
}

/** Requests HAProxy sent to a backend so far (its `stot`), or undefined when it has no such backend. */
async function served(dir: string, backend: string): Promise<number | undefined> {
  const csv = await admin(dir, 'show stat');
  const [header, ...rows] = csv.replace(/^# /, '').trim().split('\n');
  const cols = header!.split(',');
  const row = rows.map((r) => r.split(',')).find((r) => r[cols.indexOf('pxname')] === backend && r[cols.indexOf('svname')] === 'BACKEND');
  return row === undefined ? undefined : Number(row[cols.indexOf('stot')]);
}

async function get(plane: RunningProxy, host: string, path = '/', headers: Record<string, string> = {}) {
  const res = await request(`http://127.0.0.1:${plane.address.port}${path}`, { headers: { host, ...headers } });
  return { status: res.statusCode, headers: res.headers, body: await res.body.text() };
}

function events(t: TestContext): ProxyRequestEvent[] {
  const seen: ProxyRequestEvent[] = [];
  const on = (m: unknown) => seen.push(m as ProxyRequestEvent);
  subscribe(proxyRequestChannel, on);
  t.after(() => unsubscribe(proxyRequestChannel, on));
  return seen;
}

test('HAProxy serves an app of this host itself, with Fly\'s headers, request events and the machine set kept current', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'web');
  const a = await machineServer(t);
  const idA = await startedMachine(catalog, 'web', [{ ...httpService(a.port)[0]!, autostart: false }]);
  const { plane, dir } = await planeFor(t, catalog);
  const seen = events(t);

  const r = await get(plane, 'web.localhost', '/hello', { 'x-forwarded-for': '203.0.113.9', 'fly-region': 'spoofed', 'tarmac-client-ip': '198.51.100.1' });
  assert.equal(r.status, 200);
  assert.equal(r.body, `machine ${a.port}`);
  assert.match(String(r.headers['fly-request-id']), /-test-region$/);
  assert.equal(r.headers.via, '1.1 tarmac');
  const h = a.headers.at(-1)!;
  assert.equal(h['fly-client-ip'], '127.0.0.1');
  assert.equal(h['fly-region'], 'test-region');
  assert.equal(h['fly-forwarded-port'], String(plane.address.port));
  assert.equal(h['x-forwarded-proto'], 'http');
  assert.equal(h['x-forwarded-for'], '203.0.113.9, 127.0.0.1');
  assert.equal(h['fly-request-id'], r.headers['fly-request-id']);
  assert.equal(h['tarmac-client-ip'], undefined);
  assert.equal(h['tarmac-front'], undefined);
  assert.equal(await served(dir, 'app_web'), 1, 'HAProxy served it, not the Node proxy');
  const e = await waitFor('the request event', () => seen.find((x) => x.requestId === r.headers['fly-request-id']));
  assert.equal(e.app, 'web');
  assert.equal(e.machineId, idA);
  assert.equal(e.status, 200);
  assert.equal(e.method, 'GET');

  const workerPid = async () => /^Pid: (\d+)$/m.exec(await admin(dir, 'show info'))![1];
  const pid = await workerPid();
  // A second machine joins (through HAProxy's runtime API): requests spread over both.
  const b = await machineServer(t);
  await startedMachine(catalog, 'web', [{ ...httpService(b.port)[0]!, autostart: false }]);
  await waitFor('the second machine to serve', async () => {
    await Promise.all(Array.from({ length: 8 }, () => get(plane, 'web.localhost')));
    return b.hits > 0;
  });
  // It stops: its traffic ends, the app keeps serving.
  const spec = catalog.listMachines().find((m) => m.spec.config.services?.[0]?.internal_port === b.port)!.spec;
  await catalog.putMachineStatus({ id: spec.id, app: 'web', state: 'stopped', instance_id: spec.instance_id, restarts: 0, restart_generation: 0, updated_at: new Date().toISOString() });
  await waitFor('the stopped machine to leave', async () => {
    const before = b.hits;
    await Promise.all(Array.from({ length: 8 }, () => get(plane, 'web.localhost')));
    return b.hits === before;
  });
  assert.equal((await get(plane, 'web.localhost')).status, 200);
  assert.equal(await workerPid(), pid, 'machine changes did not reload HAProxy');

  // The last machine stops: the app's host goes to the Node proxy, which has no machine for it; then it comes back.
  const stop = async (state: 'stopped' | 'started') => {
    await catalog.putMachineStatus({ id: idA, app: 'web', state, instance_id: `01INST${idA}`, restarts: 0, restart_generation: 0, updated_at: new Date().toISOString() });
  };
  await stop('stopped');
  await waitFor('the Node proxy to answer for the app', async () => (await get(plane, 'web.localhost')).headers['tarmac-proxy-error'] === 'no_machine');
  await stop('started');
  const before = await served(dir, 'app_web');
  await waitFor('HAProxy to serve the app again', async () => (await get(plane, 'web.localhost')).status === 200 && (await served(dir, 'app_web'))! > before!);
  assert.equal(await workerPid(), pid, 'nor did an app leaving and coming back');
});

test('requests HAProxy does not serve itself reach the Node proxy, which sees the client\'s address, not a spoofed one', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'web');
  const a = await machineServer(t);
  const idA = await startedMachine(catalog, 'web', httpService(a.port));
  const { plane, dir } = await planeFor(t, catalog);

  const r = await get(plane, 'web.localhost', '/', { 'fly-force-instance-id': idA, 'tarmac-client-ip': '198.51.100.1', 'tarmac-front': 'guess' });
  assert.equal(r.status, 200);
  assert.equal(await served(dir, 'app_web'), 0, 'the Node proxy served it');
  assert.equal(a.headers.at(-1)!['fly-client-ip'], '127.0.0.1');
  assert.equal(a.headers.at(-1)!['fly-forwarded-port'], String(plane.address.port));
  assert.equal(a.headers.at(-1)!['tarmac-client-ip'], undefined);

  const missing = await get(plane, 'nope.localhost');
  assert.equal(missing.status, 404);
  assert.equal(missing.headers['tarmac-proxy-error'], 'app_not_found');

  // A client talking to the Node proxy directly cannot pass for the data plane.
  const nodePort = /server node 127\.0\.0\.1:(\d+)/.exec(await readFile(join(dir, 'haproxy.cfg'), 'utf8'))![1];
  const direct = await request(`http://127.0.0.1:${nodePort}/`, {
    headers: { host: 'web.localhost', 'tarmac-front': 'guess', 'tarmac-client-ip': '198.51.100.1' },
  });
  await direct.body.text();
  assert.equal(a.headers.at(-1)!['fly-client-ip'], '127.0.0.1');
  assert.equal(a.headers.at(-1)!['fly-forwarded-port'], nodePort, 'not taken for a request of the data plane');
});

/** Sends raw bytes to the plane and reads the status of the first response. */
function rawStatus(plane: RunningProxy, data: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = connect(plane.address.port, '127.0.0.1');
    let out = '';
    s.setEncoding('latin1');
    s.on('data', (d: string) => {
      out += d;
      if (out.includes('\r\n')) {
        s.destroy();
        resolve(Number(out.slice(9, 12)));
      }
    });
    s.on('error', reject);
    s.write(data);
  });
}

test('requests HAProxy would handle otherwise than the Node proxy are the Node proxy\'s', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'web');
  const a = await machineServer(t);
  await startedMachine(catalog, 'web', httpService(a.port));
  const { plane, dir } = await planeFor(t, catalog);

  // A Host that is more than a name and a port: the Node proxy refuses it (an app building links from it would not).
  for (const host of ['web.localhost:@evil.example', 'web.localhost:80:90', 'web.localhost:"x']) {
    assert.equal(await rawStatus(plane, `GET / HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`), 400, host);
  }
  assert.equal(a.hits, 0);
  // Connection naming another header: the Node proxy strips it.
  assert.equal(await rawStatus(plane, 'GET / HTTP/1.1\r\nHost: web.localhost\r\nConnection: close, x-secret\r\nX-Secret: 1\r\n\r\n'), 200);
  assert.equal(a.headers.at(-1)!['x-secret'], undefined);
  // X-Forwarded-For on two lines: one line to the machine, the client's address last.
  assert.equal(await rawStatus(plane, 'GET / HTTP/1.1\r\nHost: web.localhost\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\nConnection: close\r\n\r\n'), 200);
  assert.deepEqual(a.raw.at(-1)!.filter((_, i, r) => i % 2 === 1 && r[i - 1]!.toLowerCase() === 'x-forwarded-for'), ['6.6.6.6, 7.7.7.7, 127.0.0.1']);
  assert.equal(await served(dir, 'app_web'), 0, 'the Node proxy served all of them');
  // HAProxy itself, with one X-Forwarded-For line: still one line to the machine.
  assert.equal(await rawStatus(plane, 'GET / HTTP/1.1\r\nHost: Web.LocalHost:80\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n'), 200);
  assert.equal(await served(dir, 'app_web'), 1);
  assert.deepEqual(a.raw.at(-1)!.filter((_, i, r) => i % 2 === 1 && r[i - 1]!.toLowerCase() === 'x-forwarded-for'), ['6.6.6.6, 127.0.0.1']);
});

test('an app with autostop or an autostart candidate stays on the Node proxy', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'lazy');
  const a = await machineServer(t);
  await startedMachine(catalog, 'lazy', [{ ...httpService(a.port)[0]!, autostop: 'stop' }]);
  const { plane, dir } = await planeFor(t, catalog);
  assert.equal((await get(plane, 'lazy.localhost')).status, 200);
  assert.equal(await served(dir, 'app_lazy'), undefined);
});

test('over the hard limit a request waits in HAProxy\'s queue, then gets a 503 naming the reason', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'slow');
  let release: (() => void) | undefined;
  const a = await machineServer(t, (req, res) => {
    if (req.url !== '/hold') return false;
    release = () => res.end('held');
    return true;
  });
  await startedMachine(catalog, 'slow', httpService(a.port, { type: 'requests', soft_limit: 1, hard_limit: 1 }));
  const { plane, dir } = await planeFor(t, catalog, { queueMs: 300 }, { queuePerApp: 1 });
  const held = get(plane, 'slow.localhost', '/hold');
  await waitFor('the first request to reach the machine', () => release !== undefined);
  const queued = get(plane, 'slow.localhost', '/second');
  await waitFor('the second request to queue', async () => (await admin(dir, 'show stat')).split('\n').some((l) => l.startsWith('app_slow,BACKEND,') && l.split(',')[2] === '1'));
  const refused = await get(plane, 'slow.localhost', '/third');
  assert.equal(refused.status, 503, 'the queue holds one: refused at once');
  assert.equal(refused.headers['tarmac-proxy-error'], 'over_capacity');
  const r = await queued;
  assert.equal(r.status, 503, 'the wait ran out');
  assert.equal(r.headers['tarmac-proxy-error'], 'over_capacity');
  release!();
  assert.equal((await held).body, 'held');
});

test('fly-replay: the request that asks is sent back to the same URL and the app moves to the Node proxy, which replays', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'rp');
  const a = await machineServer(t, (req, res) => {
    if (req.url !== '/write') return false;
    res.setHeader('fly-replay', 'elsewhere=true');
    res.end();
    return true;
  });
  const b = await machineServer(t, (req, res) => {
    res.end(`replayed from ${req.headers['fly-replay-src'] === undefined ? 'nowhere' : 'a machine'}`);
    return true;
  });
  await startedMachine(catalog, 'rp', httpService(a.port));
  await startedMachine(catalog, 'rp', httpService(b.port));
  const { plane, dir } = await planeFor(t, catalog);
  // Until machine a is asked (leastconn may pick b first), requests go round.
  const first = await waitFor('a replay answer', async () => {
    const r = await get(plane, 'rp.localhost', '/write');
    return r.status === 307 ? r : undefined;
  });
  assert.equal(first.headers.location, '/write');
  assert.match(String(first.headers['fly-request-id']), /-test-region$/);
  assert.equal(first.headers['fly-replay'], undefined);
  // From now on the Node proxy has the app: a replay is followed through.
  assert.match(await admin(dir, `show map ${join(dir, 'hosts.map')}`), /rp\.localhost tarmac/, 'the app moved to the Node proxy');
  // Machine b answers itself when picked first; a replay through machine a reaches it with fly-replay-src.
  await waitFor('a request replayed from machine a to b', async () => {
    const r = await get(plane, 'rp.localhost', '/write');
    assert.equal(r.status, 200, 'no more 307s: the Node proxy replays');
    return r.body === 'replayed from a machine';
  });
});

test('close() ends HAProxy and the Node proxy', async (t) => {
  const catalog = await tempCatalog(t);
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-haproxy-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const plane = await startHaproxyPlane({ catalog, http: { host: '127.0.0.1', port: 0 }, log: silentLogger(), stateDir: dir, threads: 1 });
  const pids = () => execFileSync('pgrep', ['-f', join(dir, 'haproxy.cfg')], { encoding: 'utf8' }).trim();
  assert.notEqual(pids(), '');
  if (process.getuid?.() === 0) {
    // The worker (the master's child) parses clients' requests without root's powers.
    const uids = pids().split('\n').map((pid) => /^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);
    assert.ok(uids.some((u) => u !== '0'), `a haproxy process runs as another user (uids ${uids.join(', ')})`);
  }
  await plane.close();
  assert.throws(() => pids(), 'no haproxy process of this plane is left');
  await assert.rejects(request(`http://127.0.0.1:${plane.address.port}/`, { headers: { host: 'x.localhost' } }));
});
