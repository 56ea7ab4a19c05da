// HAProxy request events: a real haproxy logs into a ring forwarded to the receiver, which publishes ProxyRequestEvents.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server, type ServerResponse } from 'node:http';
import { connect, type AddressInfo, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { Agent, fetch } from 'undici';
import { waitFor } from '../../../test/helpers/wait.ts';
import { silentLogger } from '../../shared/log.ts';
import { proxyRequestChannel, type ProxyRequestEvent } from '../proxy.ts';
import { HaproxyEventReceiver, haproxyLogFormat, haproxyLogSections, haproxyLogTarget, OctetCountedFrames, parseHaproxyLogLine } from './events.ts';

/** A config shaped like the generated one: Host kept in txn.host by the frontend, the app set by its backend. */
function testConfig(dir: string, logPort: number, machinePort: number): string {
  return [
    'global',
    '  maxconn 200',
    `  ${haproxyLogTarget()}`,
    'defaults',
    '  mode http',
    '  log global',
    `  log-format "${haproxyLogFormat}"`,
    '  timeout connect 2s',
    '  timeout client 10s',
    '  timeout server 10s',
    '  timeout queue 300ms',
    'frontend http',
    `  bind unix@${dir}/front.sock`,
    '  unique-id-format "%{+X}o%Ts%rt%pid-test"',
    '  http-request set-var(txn.host) req.hdr(host),field(1,:),lower',
    '  http-response set-header fly-request-id %[unique-id]',
    '  use_backend dead if { path_beg /dead }',
    '  use_backend full if { path_beg /full }',
    '  default_backend app',
    'backend app',
    '  http-request set-var(txn.app) str(myapp)',
    `  server m_abc123_${machinePort} 127.0.0.1:${machinePort}`,
    'backend dead',
    '  retries 1',
    '  option redispatch 1',
    '  http-request set-var(txn.app) str(deadapp)',
    `  server m_dead01 unix@${dir}/nothing.sock`,
    'backend full',
    '  http-request set-var(txn.app) str(fullapp)',
    `  server m_full01_${machinePort} 127.0.0.1:${machinePort} maxconn 1`,
    ...haproxyLogSections(logPort),
    '',
  ].join('\n');
}

/** Starts haproxy in the foreground and waits until its frontend socket accepts connections. */
async function startHaproxy(cfg: string, frontSocket: string): Promise<ChildProcess> {
  const proc = spawn('/usr/sbin/haproxy', ['-db', '-f', cfg], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  let exited = false;
  proc.on('exit', () => (exited = true));
  await waitFor('haproxy to listen', async () => {
    if (exited) throw new Error(`haproxy exited: ${stderr}`);
    return new Promise<boolean>((resolve) => {
      const s = connect(frontSocket, () => {
        s.destroy();
        resolve(true);
      });
      s.on('error', () => resolve(false));
    });
  });
  return proc;
}

async function stopProcess(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((resolve) => proc.once('exit', resolve));
  proc.kill('SIGTERM');
  await exited;
}

/** Sends raw bytes (latin1) as one HTTP/1.1 request and returns the raw response, read until HAProxy closes. */
function rawRequest(path: string, request: string): Promise<string> {
  return new Promise((resolve, reject) => {
    // Not half-closed: HAProxy would log a client abort (CR) instead of what it did with the request.
    const s = connect(path, () => s.write(Buffer.from(request, 'latin1')));
    let response = '';
    s.on('data', (d: Buffer) => (response += d.toString('latin1')));
    s.on('end', () => resolve(response));
    s.on('error', reject);
  });
}

describe('HaproxyEventReceiver with a real haproxy', () => {
  let dir: string;
  let haproxy: ChildProcess;
  let machine: Server;
  let receiver: HaproxyEventReceiver;
  let agent: Agent;
  const held: ServerResponse[] = [];
  const events: ProxyRequestEvent[] = [];
  const collect = (e: unknown) => events.push(e as ProxyRequestEvent);

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tarmac-haproxy-events-'));
    machine = createServer((req, res) => {
      if (req.url === '/full/hold') held.push(res);
      else res.end(`hello from ${req.headers.host}`);
    });
    await new Promise<void>((resolve) => machine.listen(0, '127.0.0.1', resolve));
    receiver = await HaproxyEventReceiver.start({ log: silentLogger() });
    subscribe(proxyRequestChannel, collect);
    const cfg = join(dir, 'haproxy.cfg');
    await writeFile(cfg, testConfig(dir, receiver.port, (machine.address() as AddressInfo).port));
    haproxy = await startHaproxy(cfg, join(dir, 'front.sock'));
    agent = new Agent({ connect: { socketPath: join(dir, 'front.sock') } });
  });

  after(async () => {
    unsubscribe(proxyRequestChannel, collect);
    for (const res of held) res.end();
    await agent?.close();
    if (haproxy) await stopProcess(haproxy);
    await receiver?.close();
    machine?.closeAllConnections();
    await new Promise((resolve) => machine?.close(resolve));
    await rm(dir, { recursive: true, force: true });
  });

  const eventFor = (what: string, match: (e: ProxyRequestEvent) => boolean) => waitFor(`event for ${what}`, () => events.find(match));

  test('publishes an event per request with what HAProxy did', async () => {
    for (const method of ['GET', 'POST']) {
      const res = await fetch('http://App.Example:8080/some/path', { method, dispatcher: agent, ...(method === 'POST' ? { body: 'x' } : {}) });
      assert.equal(res.status, 200);
      const body = await res.text();
      const requestId = res.headers.get('fly-request-id');
      assert.ok(requestId);
      const e = await eventFor(requestId, (ev) => ev.requestId === requestId);
      assert.deepEqual({ ...e, durationMs: 0, responseBytes: 0 }, {
        requestId, method, host: 'app.example', app: 'myapp', machineId: 'abc123', status: 200, error: undefined, attempts: 1, durationMs: 0, responseBytes: 0,
      });
      assert.ok(e.durationMs >= 0);
      assert.ok(e.responseBytes > body.length, 'response bytes count headers and body');
    }
  });

  test('a machine that refuses connections gives backend_unreachable and 503', async () => {
    const res = await fetch('http://app.example/dead', { dispatcher: agent });
    assert.equal(res.status, 503);
    await res.arrayBuffer();
    const e = await eventFor('dead backend', (ev) => ev.app === 'deadapp');
    assert.equal(e.error, 'backend_unreachable');
    assert.equal(e.status, 503);
    assert.equal(e.machineId, 'dead01');
    assert.equal(e.responseBytes, 0);
    assert.ok(e.attempts >= 1);
  });

  test('a request that waits too long for a busy machine gives over_capacity', async () => {
    const holding = fetch('http://app.example/full/hold', { dispatcher: agent });
    await waitFor('the machine to hold a request', () => held.length === 1);
    const res = await fetch('http://app.example/full/next', { dispatcher: agent });
    assert.equal(res.status, 503);
    await res.arrayBuffer();
    held.shift()?.end('done');
    assert.equal((await holding).status, 200);
    const e = await eventFor('queued request', (ev) => ev.app === 'fullapp' && ev.status === 503);
    assert.equal(e.error, 'over_capacity');
  });

  test('a Host with quotes, spaces, escapes and control bytes is carried intact', async () => {
    const host = 'a "b" c\\d%41\xe9\x01 tm1 - get x'; // lower case: the config lowers the Host
    const response = await rawRequest(join(dir, 'front.sock'), `GET / HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`);
    // HAProxy passes the request on; node:http in the machine may refuse the control byte (400), either way is fine.
    const status = Number(/^HTTP\/1\.[01] (\d{3}) /.exec(response)?.[1]);
    const e = await eventFor('hostile host', (ev) => ev.host === host);
    assert.equal(e.app, 'myapp');
    assert.equal(e.machineId, 'abc123');
    assert.equal(e.status, status);
    assert.equal(receiver.malformedLines, 0);
  });

  test('a request HAProxy cannot parse gives bad_request', async () => {
    const response = await rawRequest(join(dir, 'front.sock'), 'G"T / HTTP/1.1\r\nHost: x\r\n\r\n');
    assert.match(response, /^HTTP\/1\.[01] 400 /);
    const e = await eventFor('bad request', (ev) => ev.error === 'bad_request');
    assert.deepEqual(e, {
      requestId: '', method: '', host: undefined, app: undefined, machineId: undefined, status: 400, error: 'bad_request', attempts: 0, durationMs: e.durationMs, responseBytes: 0,
    });
  });

  test('a client that leaves before its request is complete gives client_closed and status 0', async () => {
    const before = events.length;
    await new Promise<void>((resolve, reject) => {
      const s = connect(join(dir, 'front.sock'), () => s.end('GET /partial HTTP/1.1\r\nHost: partial.example\r\n'));
      s.on('close', () => resolve());
      s.on('error', reject);
      s.resume();
    });
    const e = await eventFor('abandoned request', (ev) => events.indexOf(ev) >= before && ev.error === 'client_closed');
    assert.equal(e.status, 0);
  });

  test('2000 quick requests all produce an event', async () => {
    const ids = new Set<string>();
    const send = async () => {
      const res = await fetch('http://burst.example/burst', { dispatcher: agent });
      await res.arrayBuffer();
      ids.add(res.headers.get('fly-request-id') ?? '');
    };
    // 50 at a time: the ring's forwarder sends many lines per write (about 35 here).
    await Promise.all(Array.from({ length: 50 }, async () => {
      for (let i = 0; i < 40; i++) await send();
    }));
    assert.equal(ids.size, 2000);
    await waitFor('an event for every request', () => {
      const seen = new Set(events.filter((e) => e.host === 'burst.example').map((e) => e.requestId));
      return [...ids].every((id) => seen.has(id));
    });
    assert.equal(receiver.malformedLines, 0);
    assert.equal(receiver.malformedStreams, 0);
  });

  test('after a reload the new worker connects and its events arrive', async (t) => {
    // A second haproxy in master-worker mode, as the data plane runs it; each worker has its own ring and forwarder.
    const mwDir = await mkdtemp(join(tmpdir(), 'tarmac-haproxy-events-mw-'));
    t.after(() => rm(mwDir, { recursive: true, force: true }));
    const cfg = join(mwDir, 'haproxy.cfg');
    const config = testConfig(mwDir, receiver.port, (machine.address() as AddressInfo).port).replace('global\n', 'global\n  master-worker\n')
      .replace('%pid-test', '-%pid-test'); // the worker's pid (hex), readable at the end of the request id
    await writeFile(cfg, config);
    const mw = await startHaproxy(cfg, join(mwDir, 'front.sock'));
    t.after(() => stopProcess(mw));
    // A fresh connection per request, so one made after the reload reaches the new worker.
    const requestEvent = async (host: string, timeoutMs?: number) => {
      const fresh = new Agent({ connect: { socketPath: join(mwDir, 'front.sock') } });
      const res = await fetch(`http://${host}/`, { dispatcher: fresh });
      await res.arrayBuffer();
      await fresh.close();
      const id = res.headers.get('fly-request-id');
      return waitFor(`event for ${host}`, () => events.find((e) => e.requestId === id), timeoutMs);
    };
    const workerOf = (e: ProxyRequestEvent) => /-([0-9A-F]+)-test$/.exec(e.requestId)?.[1];
    const first = workerOf(await requestEvent('before-reload.example'));
    assert.ok(first);
    mw.kill('SIGUSR2');
    // The old worker's forwarder stops with it, so a request it still takes during the reload gives no event: retry.
    await waitFor('an event from the new worker', async () => {
      const worker = workerOf(await requestEvent('after-reload.example', 2000));
      return worker !== undefined && worker !== first;
    });
  });

  test('messages that are not log lines are counted and dropped, the connection kept', async () => {
    const before = receiver.malformedLines;
    const s = await connectTo(receiver.port);
    s.write('14 not a log line');
    await waitFor('the line to be counted', () => receiver.malformedLines === before + 1);
    assert.equal(s.destroyed, false);
    s.destroy();
  });

  test('a malformed frame length closes that connection only, and is counted', async () => {
    const before = receiver.malformedStreams;
    const good = await connectTo(receiver.port);
    const bad = await connectTo(receiver.port);
    const closed = new Promise((resolve) => bad.once('close', resolve));
    bad.write('12x tm1 whatever');
    await closed;
    assert.equal(receiver.malformedStreams, before + 1);
    // Another sender (HAProxy keeps one per worker, so several during a reload) is unaffected.
    good.write(frame('tm1 other-conn GET h.example a m_m1 200 1 2 0 --'));
    await eventFor('the other connection', (e) => e.requestId === 'other-conn');
    good.destroy();
  });
});

describe('OctetCountedFrames', () => {
  const messages = ['tm1 a GET h a m_x 200 1 2 0 --', 'x', 'é'.repeat(300), 'tm1 b POST h a <NOSRV> 503 0 0 0 SC'];
  const stream = Buffer.concat(messages.map((m) => frame(m)));
  const reader = () => {
    const got: string[] = [];
    return { got, frames: new OctetCountedFrames(1000, (buf, start, end) => got.push(buf.toString('latin1', start, end))) };
  };

  test('reads every frame from one big chunk', () => {
    const { got, frames } = reader();
    assert.equal(frames.push(stream), true);
    assert.deepEqual(got, messages);
  });

  test('reads frames fed byte by byte', () => {
    const { got, frames } = reader();
    for (let i = 0; i < stream.length; i++) assert.equal(frames.push(stream.subarray(i, i + 1)), true);
    assert.deepEqual(got, messages);
  });

  test('reads frames split at every point between two chunks', () => {
    for (let at = 0; at <= stream.length; at++) {
      const { got, frames } = reader();
      frames.push(stream.subarray(0, at));
      frames.push(stream.subarray(at));
      assert.deepEqual(got, messages, `split at ${at}`);
    }
  });

  test('rejects a bad length: not digits, a leading zero, no digits, or over the maximum', () => {
    for (const bad of ['x1 a', '01 a', ' a', '1001 a', '3 abc12a bc']) {
      const { frames } = reader();
      assert.equal(frames.push(Buffer.from(bad, 'latin1')), false, bad);
    }
  });
});

/** One octet-counted frame as HAProxy's ring forwarder sends it. */
function frame(message: string): Buffer {
  const body = Buffer.from(message, 'latin1');
  return Buffer.concat([Buffer.from(`${body.length} `), body]);
}

function connectTo(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect(port, '127.0.0.1', () => resolve(s));
    s.once('error', reject);
  });
}

describe('parseHaproxyLogLine', () => {
  test('reads a raw line and one behind a syslog header', () => {
    const line = 'tm1 6B1-local GET app.example myapp m_abc123_8080 200 12 345 0 --\n';
    const expected = {
      requestId: '6B1-local', method: 'GET', host: 'app.example', app: 'myapp', machineId: 'abc123', status: 200, error: undefined, attempts: 1, durationMs: 12, responseBytes: 345,
    };
    assert.deepEqual(parseHaproxyLogLine(line), expected);
    assert.deepEqual(parseHaproxyLogLine(`<134>Dec  6 05:54:01 haproxy[42]: ${line}`), expected);
  });

  test('maps termination states to proxy errors', () => {
    const at = (server: string, status: number, retries: string, state: string) =>
      parseHaproxyLogLine(`tm1 id GET h a ${server} ${status} 5 217 ${retries} ${state}`);
    assert.deepEqual(pick(at('m_m1', 503, '+1', 'SC')), { error: 'backend_unreachable', status: 503, attempts: 2, responseBytes: 0 });
    assert.deepEqual(pick(at('<NOSRV>', 503, '0', 'SC')), { error: 'no_machine', status: 503, attempts: 0, responseBytes: 0 });
    assert.deepEqual(pick(at('m_m1', 504, '0', 'sH')), { error: 'backend_timeout', status: 504, attempts: 1, responseBytes: 0 });
    assert.deepEqual(pick(at('m_m1', 502, '0', 'SH')), { error: 'backend_error', status: 502, attempts: 1, responseBytes: 0 });
    assert.deepEqual(pick(at('<NOSRV>', 503, '0', 'sQ')), { error: 'over_capacity', status: 503, attempts: 0, responseBytes: 0 });
    assert.deepEqual(pick(at('m_m1', -1, '0', 'CH')), { error: 'client_closed', status: 0, attempts: 1, responseBytes: 0 });
    assert.deepEqual(pick(at('m_m1', 200, '0', 'CD')), { error: 'client_closed', status: 200, attempts: 1, responseBytes: 217 });
    assert.deepEqual(pick(at('<NOSRV>', 408, '0', 'cR')), { error: 'request_timeout', status: 408, attempts: 0, responseBytes: 0 });
    assert.deepEqual(pick(at('<NOSRV>', 302, '0', 'LR')), { error: undefined, status: 302, attempts: 0, responseBytes: 0 });
  });

  test('rejects lines that are not in the format, truncated ones included', () => {
    for (const line of ['', 'garbage', 'tm1 id GET h a m_x 200 1 2 0', 'tm1 id GET h a m_x 200 1 2 0 -', 'tm2 id GET h a m_x 200 1 2 0 --', 'tm1 id GET h a m_x OK 1 2 0 --', 'tm1 id GET h  a m_x 200 1 2 0 --']) {
      assert.equal(parseHaproxyLogLine(line), undefined, JSON.stringify(line));
    }
  });
});

function pick(e: ProxyRequestEvent | undefined) {
  assert.ok(e);
  return { error: e.error, status: e.status, attempts: e.attempts, responseBytes: e.responseBytes };
}

describe('HaproxyEventReceiver with a key', () => {
  test('only lines that start with the key are events (any local process can connect to the receiver)', async (t) => {
    const receiver = await HaproxyEventReceiver.start({ log: silentLogger(), key: 'k3y' });
    t.after(() => receiver.close());
    assert.equal(receiver.logFormat, `k3y ${haproxyLogFormat}`);
    const seen: ProxyRequestEvent[] = [];
    const on = (m: unknown) => seen.push(m as ProxyRequestEvent);
    subscribe(proxyRequestChannel, on);
    t.after(() => unsubscribe(proxyRequestChannel, on));
    const s = await connectTo(receiver.port);
    t.after(() => s.destroy());
    s.write(frame('tm1 forged GET h a m_x 200 1 2 0 --'));
    s.write(frame('k3y tm1 real GET h a m_x 200 1 2 0 --'));
    await waitFor('the keyed line', () => seen.length > 0);
    assert.deepEqual(seen.map((e) => e.requestId), ['real']);
    assert.equal(receiver.malformedLines, 1);
  });
});
