// The first-cut proxy against real sockets: a real SQLite catalog, node:http servers playing machines, real clients.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { connect, type AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { Agent, request } from 'undici';
import { type Catalog, type MachineConfig, type MachineSpec, type MachineStatus } from '../catalog/index.ts';
import { silentLogger } from '../shared/log.ts';
import { proxyRequestChannel, startProxy, type ProxyRequestEvent, type ProxyTimeouts, type RunningProxy } from './index.ts';
import { tempCatalog } from './testing.ts';
import { waitFor } from '../../test/helpers/wait.ts';
import { freePort } from '../../test/helpers/registry.ts';

const now = () => new Date().toISOString();

setFlagsFromString('--expose-gc');
/** A full garbage collection, to measure live memory rather than garbage. */
const gc = runInNewContext('gc') as () => void;

interface TestBackend { port: number; host: string; hits: number; server: Server }

/** A node:http server on loopback that plays a machine. */
async function backend(t: TestContext, handler: (req: IncomingMessage, res: ServerResponse) => void, host = '127.0.0.1'): Promise<TestBackend> {
  const b: TestBackend = { port: 0, host, hits: 0, server: undefined as unknown as Server };
  b.server = createServer((req, res) => {
    b.hits++;
    handler(req, res);
  });
  await new Promise<void>((resolve) => b.server.listen(0, host, resolve));
  b.port = (b.server.address() as AddressInfo).port;
  t.after(() => closeServer(b.server));
  return b;
}

function closeServer(server: Server): Promise<void> {
  server.closeAllConnections();
  return new Promise((resolve) => server.close(() => resolve()));
}

function httpService(internalPort: number, handlers: Array<'http' | 'tls'> = ['http'], port = 80): NonNullable<MachineConfig['services']> {
  return [{ protocol: 'tcp', internal_port: internalPort, ports: [{ port, handlers }] }];
}

let machineSeq = 0;

/** Writes an app's machine the way the API and the worker would: a spec, then an observed status. */
async function machine(
  c: Catalog, app: string,
  o: { ip: string; services: NonNullable<MachineConfig['services']>; state?: MachineStatus['state'] },
): Promise<string> {
  const id = (++machineSeq).toString(16).padStart(14, '0');
  const spec: MachineSpec = {
    id, app, name: `m${machineSeq}`, region: 'local', host_id: 'h1', config: { image: 'busybox', services: o.services },
    instance_id: `01INST${id}`, version: 1, desired: 'started', restart_generation: 0, cordoned: false,
    private_ip: o.ip, created_at: now(), updated_at: now(),
  };
  await c.createMachine(spec, []);
  await setState(c, app, id, o.state ?? 'started');
  return id;
}

function setState(c: Catalog, app: string, id: string, state: MachineStatus['state']): Promise<void> {
  return c.putMachineStatus({ id, app, state, instance_id: `01INST${id}`, restarts: 0, restart_generation: 0, updated_at: now() });
}

async function app(c: Catalog, name: string): Promise<void> {
  await c.createApp({ name, org_slug: 'personal', network: 'default', created_at: now() });
}

async function proxyFor(t: TestContext, catalog: Catalog, timeouts: ProxyTimeouts = {}): Promise<RunningProxy> {
  const proxy = await startProxy({
    catalog, http: { host: '127.0.0.1', port: 0 }, appsDomain: 'localhost', log: silentLogger(), region: 'test-region', timeouts,
  });
  t.after(() => proxy.close());
  return proxy;
}

function agent(t: TestContext): Agent {
  const a = new Agent({ pipelining: 1 });
  t.after(() => a.destroy());
  return a;
}

async function get(a: Agent, proxy: RunningProxy, host: string, path = '/', headers: Record<string, string> = {}) {
  const res = await request(`http://127.0.0.1:${proxy.address.port}${path}`, { dispatcher: a, headers: { host, ...headers } });
  const body = await res.body.text();
  return { status: res.statusCode, headers: res.headers, body };
}

/** Sends raw bytes and collects everything the proxy answers until it closes the connection. */
function raw(proxy: RunningProxy, data: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(proxy.address.port, '127.0.0.1');
    let out = '';
    s.setEncoding('latin1');
    s.on('data', (d: string) => { out += d; });
    s.on('end', () => resolve(out));
    s.on('error', reject);
    s.setTimeout(5_000, () => { s.destroy(); reject(new Error(`no close after: ${out}`)); });
    s.write(data);
  });
}

/** A latch a backend can wait on until the test releases it. */
function latch(): { wait: Promise<void>; release(): void } {
  let release!: () => void;
  const wait = new Promise<void>((r) => { release = r; });
  return { wait, release };
}

test('routes by Host to the app that serves it, case-insensitive, over IPv4 and IPv6', async (t) => {
  const c = await tempCatalog(t);
  const a = await backend(t, (_q, s) => s.end('from-a'));
  const b = await backend(t, (_q, s) => s.end('from-b'), '::1');
  await app(c, 'alpha');
  await app(c, 'beta');
  await machine(c, 'alpha', { ip: '127.0.0.1', services: httpService(a.port) });
  await machine(c, 'beta', { ip: '::1', services: httpService(b.port) });
  const proxy = await proxyFor(t, c);
  const ag = agent(t);

  assert.equal((await get(ag, proxy, 'alpha.localhost')).body, 'from-a');
  assert.equal((await get(ag, proxy, `beta.localhost:${proxy.address.port}`)).body, 'from-b');
  assert.equal((await get(ag, proxy, 'BETA.LocalHost.')).body, 'from-b');
  assert.deepEqual([a.hits, b.hits], [1, 2]);
  assert.deepEqual(proxy.routes.apps.get('beta')?.backends.map((x) => x.origin), [`http://[::1]:${b.port}`]);
});

test('only started machines with an http service on port 80 are routed; otherwise 503 naming the app', async (t) => {
  const c = await tempCatalog(t);
  const b = await backend(t, (_q, s) => s.end('x'));
  await app(c, 'quiet');
  await machine(c, 'quiet', { ip: '127.0.0.1', services: httpService(b.port), state: 'stopped' });
  await machine(c, 'quiet', { ip: '127.0.0.1', services: httpService(b.port, ['http'], 8080) });
  await machine(c, 'quiet', { ip: '127.0.0.1', services: httpService(b.port, ['tls']) });
  const proxy = await proxyFor(t, c);
  const ag = agent(t);

  const r = await get(ag, proxy, 'quiet.localhost');
  assert.equal(r.status, 503);
  assert.equal(r.headers['tarmac-proxy-error'], 'no_machine');
  assert.match(r.body, /no started machine can serve app quiet/);
  assert.equal(b.hits, 0);
});

test('requests spread over all three started machines (equally loaded ones are picked at random)', async (t) => {
  const c = await tempCatalog(t);
  await app(c, 'web');
  const bs = [];
  for (let i = 0; i < 3; i++) {
    const b = await backend(t, (_q, s) => s.end(`m${i}`));
    bs.push(b);
    await machine(c, 'web', { ip: '127.0.0.1', services: httpService(b.port) });
  }
  const proxy = await proxyFor(t, c);
  const ag = agent(t);
  // One at a time every machine has nothing in flight, so each pick is a random tie: 90 requests miss one of three
  // machines with probability about 3·(2/3)^90 ≈ 4e-16.
  for (let i = 0; i < 90; i++) assert.equal((await get(ag, proxy, 'web.localhost')).status, 200);
  assert.ok(bs.every((b) => b.hits > 0), `hits: ${bs.map((b) => b.hits).join(',')}`);
  assert.equal(bs.reduce((n, b) => n + b.hits, 0), 90);
});

test('a machine that stops leaves the table, a new one joins, and a streaming request spanning the swap completes', async (t) => {
  const c = await tempCatalog(t);
  await app(c, 'web');
  const gate = latch();
  const first = await backend(t, (req, res) => {
    if (req.url === '/slow') {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.write('part1-');
      void gate.wait.then(() => res.end('part2'));
      return;
    }
    res.end('first');
  });
  const second = await backend(t, (_q, s) => s.end('second'));
  const m1 = await machine(c, 'web', { ip: '127.0.0.1', services: httpService(first.port) });
  const proxy = await proxyFor(t, c);
  const ag = agent(t);
  const v0 = proxy.routes.version;

  // The slow request reaches the first machine and holds its response open.
  const slow = request(`http://127.0.0.1:${proxy.address.port}/slow`, { dispatcher: ag, headers: { host: 'web.localhost' } });
  const slowRes = await slow;
  const chunks: string[] = [];
  slowRes.body.setEncoding('utf8');
  slowRes.body.on('data', (d: string) => chunks.push(d));
  await waitFor('first chunk', () => chunks.join('') === 'part1-');

  // The worker reports it stopped; another machine starts. The table swaps in between.
  await setState(c, 'web', m1, 'stopped');
  await machine(c, 'web', { ip: '127.0.0.1', services: httpService(second.port) });
  await waitFor('table swap', () => proxy.routes.apps.get('web')?.backends.length === 1 && proxy.routes.apps.get('web')?.backends[0]?.port === second.port);
  assert.ok(proxy.routes.version > v0);

  const hitsBefore = first.hits;
  for (let i = 0; i < 5; i++) assert.equal((await get(ag, proxy, 'web.localhost')).body, 'second');
  assert.equal(first.hits, hitsBefore, 'the stopped machine gets no new requests');

  gate.release();
  await new Promise<void>((resolve, reject) => { slowRes.body.on('end', resolve); slowRes.body.on('error', reject); });
  assert.equal(slowRes.statusCode, 200);
  assert.equal(chunks.join(''), 'part1-part2');
});

test('bodies stream both ways: 50 MB up and down with backpressure and without buffering whole bodies', async (t) => {
  const size = 50 * 1024 * 1024;
  const chunk = Buffer.alloc(64 * 1024, 97);
  const c = await tempCatalog(t);
  await app(c, 'big');
  let downloadWritten = 0;
  let downloadWaiting = false;
  const b = await backend(t, (req, res) => {
    if (req.method === 'POST') {
      let got = 0;
      req.on('data', (d: Buffer) => { got += d.length; });
      req.on('end', () => res.end(String(got)));
      return;
    }
    res.writeHead(200, { 'content-length': String(size) });
    const pump = () => {
      while (downloadWritten < size) {
        downloadWritten += chunk.length;
        if (!res.write(chunk)) {
          downloadWaiting = true;
          res.once('drain', () => { downloadWaiting = false; pump(); });
          return;
        }
      }
      res.end();
    };
    pump();
  });
  await machine(c, 'big', { ip: '127.0.0.1', services: httpService(b.port) });
  const proxy = await proxyFor(t, c);
  const ag = agent(t);

  // Live memory (after a full GC) sampled throughout: garbage that is merely not yet collected does not count.
  const live = () => { gc(); const m = process.memoryUsage(); return m.arrayBuffers + m.heapUsed; };
  let peak = 0;
  const base = live();
  const sampler = setInterval(() => { peak = Math.max(peak, live() - base); }, 20);
  t.after(() => clearInterval(sampler));

  // Upload: a generated stream, never held whole by anyone.
  let sent = 0;
  const upload = new Readable({
    read() {
      if (sent >= size) this.push(null);
      else { sent += chunk.length; this.push(chunk); }
    },
  });
  const up = await request(`http://127.0.0.1:${proxy.address.port}/up`, {
    dispatcher: ag, method: 'POST', body: upload, headers: { host: 'big.localhost', 'content-type': 'application/octet-stream' },
  });
  assert.equal(await up.body.text(), String(size));

  // Download: the client stops reading; the machine must be held back by backpressure through the proxy.
  const down = await request(`http://127.0.0.1:${proxy.address.port}/down`, { dispatcher: ag, headers: { host: 'big.localhost' } });
  let received = 0;
  down.body.on('data', (d: Buffer) => { received += d.length; });
  await waitFor('some bytes', () => received > 0);
  down.body.pause();
  let last = -1;
  await waitFor('backend blocked', () => {
    const blocked = downloadWaiting && last === downloadWritten;
    last = downloadWritten;
    return blocked;
  }, 10_000);
  assert.ok(downloadWritten < size / 2, `backend wrote ${downloadWritten} bytes while the client was paused`);
  down.body.resume();
  await new Promise<void>((resolve, reject) => { down.body.on('end', resolve); down.body.on('error', reject); });
  assert.equal(received, size);
  clearInterval(sampler);
  assert.ok(peak < 20 * 1024 * 1024, `live memory grew by ${Math.round(peak / 1048576)} MB moving 2 x 50 MB`);
});

test('unknown app 404, backend down 502, retry on another machine when one of two is down', async (t) => {
  const c = await tempCatalog(t);
  const good = await backend(t, (_q, s) => s.end('good'));
  await app(c, 'down');
  await app(c, 'half');
  await machine(c, 'down', { ip: '127.0.0.1', services: httpService(await freePort()) });
  await machine(c, 'half', { ip: '127.0.0.1', services: httpService(await freePort()) });
  await machine(c, 'half', { ip: '127.0.0.1', services: httpService(good.port) });
  const proxy = await proxyFor(t, c);
  const ag = agent(t);

  const nf = await get(ag, proxy, 'nope.localhost');
  assert.equal(nf.status, 404);
  assert.equal(nf.headers['tarmac-proxy-error'], 'app_not_found');
  assert.match(nf.body, /nope\.localhost/);
  assert.equal((await get(ag, proxy, 'localhost')).status, 404);
  assert.equal((await get(ag, proxy, '127.0.0.1')).status, 404);

  const down = await get(ag, proxy, 'down.localhost');
  assert.equal(down.status, 502);
  assert.equal(down.headers['tarmac-proxy-error'], 'backend_unreachable');
  assert.match(down.body, /could not reach a machine of app down/);

  for (let i = 0; i < 6; i++) {
    const r = await get(ag, proxy, 'half.localhost');
    assert.equal(r.status, 200);
    assert.equal(r.body, 'good');
  }
  // A POST with a body is retried too: nothing was sent to the refused machine.
  for (let i = 0; i < 2; i++) {
    const r = await request(`http://127.0.0.1:${proxy.address.port}/`, { dispatcher: ag, method: 'POST', body: 'payload', headers: { host: 'half.localhost' } });
    assert.equal(r.statusCode, 200);
    await r.body.text();
  }
});

test('a machine that does not answer in time gets a 504', async (t) => {
  const c = await tempCatalog(t);
  const mute = await backend(t, () => { /* never answers */ });
  await app(c, 'mute');
  await machine(c, 'mute', { ip: '127.0.0.1', services: httpService(mute.port) });
  const proxy = await proxyFor(t, c, { backendHeadersMs: 200 });
  const r = await get(agent(t), proxy, 'mute.localhost');
  assert.equal(r.status, 504);
  assert.equal(r.headers['tarmac-proxy-error'], 'backend_timeout');
});

test('a machine that stalls its body past backendBodyMs is cut; a slow upload does not start the headers timeout', async (t) => {
  const c = await tempCatalog(t);
  const stalls = await backend(t, (req, res) => {
    if (req.url === '/upload') {
      // Answers only once the whole (slowly sent) body is in.
      let n = 0;
      req.on('data', (d: Buffer) => { n += d.length; });
      req.on('end', () => res.end(`got ${n}`));
      return;
    }
    res.writeHead(200, { 'content-length': '10' });
    res.write('12345'); // and never the rest
  });
  await app(c, 'stall');
  await machine(c, 'stall', { ip: '127.0.0.1', services: httpService(stalls.port) });
  const proxy = await proxyFor(t, c, { backendHeadersMs: 300, backendBodyMs: 300 });
  const started = performance.now();
  await assert.rejects(get(agent(t), proxy, 'stall.localhost'), 'the client sees the response cut short');
  assert.ok(performance.now() - started >= 300, 'not before the body timeout');

  // The body takes longer than the headers timeout to arrive, but keeps flowing: the machine's answer is relayed.
  let sent = 0;
  const body = new Readable({
    read() {
      if (sent === 8) return this.push(null);
      sent++;
      setTimeout(() => this.push(Buffer.alloc(1000, 97)), 100);
    },
  });
  const res = await request(`http://127.0.0.1:${proxy.address.port}/upload`, { method: 'POST', body, headers: { host: 'stall.localhost' }, dispatcher: agent(t) });
  assert.equal(res.statusCode, 200);
  assert.equal(await res.body.text(), 'got 8000');
});

test('forwarding headers are added, spoofed ones replaced, hop-by-hop stripped both ways', async (t) => {
  const c = await tempCatalog(t);
  const echo = await backend(t, (req, res) => {
    res.setHeader('keep-alive', 'timeout=5');
    res.setHeader('x-internal', 'secret');
    res.setHeader('connection', 'x-internal');
    res.setHeader('x-kept', 'yes');
    res.end(JSON.stringify(req.rawHeaders));
  });
  await app(c, 'hdr');
  await machine(c, 'hdr', { ip: '127.0.0.1', services: httpService(echo.port) });
  const proxy = await proxyFor(t, c);

  const answer = await raw(proxy, [
    'GET /h HTTP/1.1', 'Host: hdr.localhost', 'Connection: close, X-Secret', 'X-Secret: s', 'Keep-Alive: timeout=9',
    'TE: trailers', 'Proxy-Connection: keep-alive', 'Upgrade: h2c', 'X-Forwarded-For: 203.0.113.9', 'Fly-Client-IP: 6.6.6.6',
    'Fly-Request-Id: forged', 'X-Forwarded-Proto: https', 'Fly-Replay-Src: instance=forged', 'X-App: kept', '', '',
  ].join('\r\n'));
  const [head, body] = answer.split('\r\n\r\n') as [string, string];
  const sent = JSON.parse(body) as string[];
  const h = new Map<string, string[]>();
  for (let i = 0; i < sent.length; i += 2) {
    const k = sent[i]!.toLowerCase();
    h.set(k, [...(h.get(k) ?? []), sent[i + 1]!]);
  }
  for (const gone of ['x-secret', 'keep-alive', 'te', 'proxy-connection', 'upgrade', 'transfer-encoding', 'fly-replay-src']) assert.ok(!h.has(gone), `${gone} was forwarded`);
  assert.deepEqual(h.get('connection') ?? ['keep-alive'], ['keep-alive'], 'only the proxy’s own connection handling');
  assert.deepEqual(h.get('host'), ['hdr.localhost']);
  assert.deepEqual(h.get('x-app'), ['kept']);
  assert.deepEqual(h.get('fly-client-ip'), ['127.0.0.1']);
  assert.deepEqual(h.get('x-forwarded-for'), ['203.0.113.9, 127.0.0.1']);
  assert.deepEqual(h.get('x-forwarded-proto'), ['http']);
  assert.deepEqual(h.get('x-forwarded-port'), [String(proxy.address.port)]);
  assert.deepEqual(h.get('fly-forwarded-port'), [String(proxy.address.port)]);
  assert.deepEqual(h.get('fly-region'), ['test-region']);
  assert.deepEqual(h.get('via'), ['1.1 tarmac']);
  const id = h.get('fly-request-id');
  assert.equal(id?.length, 1);
  assert.notEqual(id?.[0], 'forged');

  const lines = head.toLowerCase().split('\r\n');
  assert.match(lines[0]!, /^http\/1\.1 200/);
  assert.ok(lines.includes('x-kept: yes'));
  assert.ok(lines.includes(`fly-request-id: ${id![0]!.toLowerCase()}`));
  assert.ok(!lines.some((l) => l.startsWith('x-internal') || l.startsWith('keep-alive')), head);
});

test('malformed requests get a 400 and the proxy keeps serving', async (t) => {
  const c = await tempCatalog(t);
  const ok = await backend(t, (_q, s) => s.end('ok'));
  await app(c, 'web');
  await machine(c, 'web', { ip: '127.0.0.1', services: httpService(ok.port) });
  const proxy = await proxyFor(t, c);

  const cases = [
    'GARBAGE\r\n\r\n',
    'GET / HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n',
    'GET / HTTP/1.1\r\nHost: web.localhost\r\nBad Header: x\r\n\r\n',
    'GET / HTTP/1.1\r\nHost: web.localhost\r\n folded: continuation\r\n\r\n',
    'GET / HTTP/1.1\r\nHost: web.localhost\r\nHost: other.localhost\r\nConnection: close\r\n\r\n',
    'GET / HTTP/1.1\r\nConnection: close\r\n\r\n',
  ];
  for (const bad of cases) {
    const answer = await raw(proxy, bad);
    assert.match(answer, /^HTTP\/1\.1 400 /, `answer to ${JSON.stringify(bad)}: ${answer}`);
  }
  assert.match(await raw(proxy, 'GARBAGE\r\n\r\n'), /tarmac-proxy-error: bad_request/);
  assert.equal(ok.hits, 0, 'no malformed request reached the machine');
  assert.equal((await get(agent(t), proxy, 'web.localhost')).body, 'ok');
});

test('request events are published on the diagnostics channel', async (t) => {
  const c = await tempCatalog(t);
  const ok = await backend(t, (_q, s) => s.end('ok'));
  await app(c, 'web');
  const id = await machine(c, 'web', { ip: '127.0.0.1', services: httpService(ok.port) });
  const proxy = await proxyFor(t, c);
  const events: ProxyRequestEvent[] = [];
  const onEvent = (m: unknown) => events.push(m as ProxyRequestEvent);
  subscribe(proxyRequestChannel, onEvent);
  t.after(() => unsubscribe(proxyRequestChannel, onEvent));
  const ag = agent(t);
  await get(ag, proxy, 'web.localhost');
  await get(ag, proxy, 'nope.localhost');
  await waitFor('two events', () => events.length === 2);
  assert.equal(events[0]?.app, 'web');
  assert.equal(events[0]?.machineId, id);
  assert.equal(events[0]?.status, 200);
  assert.equal(events[0]?.attempts, 1);
  assert.equal(events[1]?.error, 'app_not_found');
  assert.equal(events[1]?.status, 404);
});

test('close() stops accepting, drains in-flight requests, and cuts them after the drain timeout', async (t) => {
  const c = await tempCatalog(t);
  const gate = latch();
  const slow = await backend(t, (req, res) => {
    res.writeHead(200);
    res.write('begin-');
    if (req.url === '/forever') return;
    void gate.wait.then(() => res.end('end'));
  });
  await app(c, 'web');
  await machine(c, 'web', { ip: '127.0.0.1', services: httpService(slow.port) });

  // Drains: the in-flight request finishes after close() was called.
  const proxy = await proxyFor(t, c);
  const ag = agent(t);
  const res = await request(`http://127.0.0.1:${proxy.address.port}/`, { dispatcher: ag, headers: { host: 'web.localhost' } });
  const bodyDone = res.body.text();
  let closed = false;
  const closing = proxy.close().then(() => { closed = true; });
  const refused = await new Promise<boolean>((resolve) => {
    const s = connect(proxy.address.port, '127.0.0.1');
    s.on('connect', () => { s.destroy(); resolve(false); });
    s.on('error', () => resolve(true));
  });
  assert.ok(refused, 'new connections are refused while draining');
  assert.equal(closed, false);
  gate.release();
  assert.equal(await bodyDone, 'begin-end');
  await closing;

  // Cuts: a request that never ends is destroyed once the drain timeout passes.
  const p2 = await proxyFor(t, c, { drainMs: 200 });
  const stuck = await request(`http://127.0.0.1:${p2.address.port}/forever`, { dispatcher: ag, headers: { host: 'web.localhost' } });
  const stuckBody = stuck.body.text().then(() => 'ended', () => 'cut');
  const started = Date.now();
  await p2.close();
  assert.ok(Date.now() - started < 3_000);
  assert.equal(await stuckBody, 'cut');
});
