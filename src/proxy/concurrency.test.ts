// Fly's balancing and concurrency limits against slow real backends: least loaded first, soft before hard, a bounded queue, 503s.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Agent, request } from 'undici';
import { waitFor } from '../../test/helpers/wait.ts';
import type { Catalog } from '../catalog/index.ts';
import { appBackend } from './haproxy/config.ts';
import type { RunningProxy } from './proxy.ts';
import { createApp, httpService, proxyEngines, proxyFor, haproxyStats, proxyOn, queueLength, startedMachine, tempCatalog, type ProxyEngine } from './testing.ts';

interface SlowBackend { port: number; name: string; active: number; max: number; hits: number; release(): void; server: Server }

/** A machine that holds requests for `/hold` until the test releases them and answers anything else at once. */
async function slowBackend(t: TestContext, name: string): Promise<SlowBackend> {
  let waiting: Array<() => void> = [];
  const b: SlowBackend = {
    port: 0, name, active: 0, max: 0, hits: 0, server: undefined as unknown as Server,
    release: () => {
      const w = waiting;
      waiting = [];
      for (const f of w) f();
    },
  };
  b.server = createServer((req, res) => {
    b.hits++;
    b.active++;
    b.max = Math.max(b.max, b.active);
    const done = () => {
      b.active--;
      res.end(name);
    };
    if (req.url === '/hold') waiting.push(done);
    else done();
  });
  await new Promise<void>((resolve) => b.server.listen(0, '127.0.0.1', resolve));
  b.port = (b.server.address() as AddressInfo).port;
  t.after(() => {
    b.release();
    b.server.closeAllConnections();
    return new Promise<void>((resolve) => b.server.close(() => resolve()));
  });
  return b;
}

function agent(t: TestContext): Agent {
  const a = new Agent({ connections: 100 });
  t.after(() => a.destroy());
  return a;
}

async function get(a: Agent, proxy: RunningProxy, path: string) {
  const res = await request(`http://127.0.0.1:${proxy.address.port}${path}`, { dispatcher: a, headers: { host: 'web.localhost' } });
  return { status: res.statusCode, code: res.headers['tarmac-proxy-error'], body: await res.body.text() };
}

/** `show stat` rows of app web's backend on the HAProxy data plane of `proxy` (its current worker). */
async function haproxyWebStats(proxy: RunningProxy): Promise<Record<string, string>[]> {
  return (await haproxyStats(proxy)).filter((r) => r.pxname === appBackend('web'));
}

/** Requests in flight on a machine of app web: the Node proxy's count, or HAProxy's current sessions of its server. */
async function inflight(engine: ProxyEngine, proxy: RunningProxy, machineId: string): Promise<number> {
  if (engine === 'node') return proxy.routes.apps.get('web')?.backends.find((b) => b.machineId === machineId)?.inflight ?? -1;
  const row = (await haproxyWebStats(proxy)).find((r) => r.svname?.startsWith(`m_${machineId}_`));
  return row === undefined ? -1 : Number(row.scur);
}

/** Reads app web's queue length: the Node proxy's queue events, or the requests HAProxy queued for the app. */
function queueLengthOn(engine: ProxyEngine, t: TestContext, proxy: RunningProxy): () => Promise<number> {
  if (engine === 'node') {
    const queued = queueLength(t);
    return () => Promise.resolve(queued());
  }
  return async () => (await haproxyWebStats(proxy)).filter((r) => r.svname === 'BACKEND').reduce((n, r) => n + Number(r.qcur), 0);
}

async function webApp(t: TestContext): Promise<Catalog> {
  const c = await tempCatalog(t);
  await createApp(c, 'web');
  return c;
}

for (const engine of proxyEngines) {
test(`${engine}: at the hard limit requests wait in the queue and are served as slots free up; the machine never sees more`, async (t) => {
  const c = await webApp(t);
  const b = await slowBackend(t, 'a');
  const id = await startedMachine(c, 'web', httpService(b.port, { type: 'requests', soft_limit: 1, hard_limit: 2 }));
  const proxy = await proxyOn(engine, t, c);
  const queueLen = queueLengthOn(engine, t, proxy);
  const ag = agent(t);
  const all = Array.from({ length: 6 }, () => get(ag, proxy, '/hold'));
  await waitFor('two requests to reach the machine and four to wait', async () => b.active === 2 && await queueLen() === 4);
  assert.equal(await inflight(engine, proxy, id), 2);
  // Release whatever is held until every request is answered; the others arrive two at a time.
  let settled = false;
  const results = Promise.all(all).finally(() => { settled = true; });
  await waitFor('all six to be served', () => {
    b.release();
    return settled;
  });
  for (const r of await results) assert.deepEqual([r.status, r.body], [200, 'a']);
  assert.equal(b.hits, 6);
  assert.equal(b.max, 2);
  await waitFor('the slots to be given back', async () => await inflight(engine, proxy, id) === 0);
});

test(`${engine}: least loaded first: a machine with a request in flight gets no new ones while another has none`, async (t) => {
  const c = await webApp(t);
  const a = await slowBackend(t, 'a');
  const b = await slowBackend(t, 'b');
  await startedMachine(c, 'web', httpService(a.port));
  await startedMachine(c, 'web', httpService(b.port));
  const proxy = await proxyOn(engine, t, c);
  const ag = agent(t);
  const held = get(ag, proxy, '/hold');
  await waitFor('the held request to land', () => a.active + b.active === 1);
  const busy = a.active === 1 ? a : b;
  const idle = busy === a ? b : a;
  for (let i = 0; i < 10; i++) assert.equal((await get(ag, proxy, '/quick')).body, idle.name);
  assert.equal(busy.hits, 1);
  busy.release();
  assert.equal((await held).body, busy.name);
});

// On HAProxy a new machine of an app it serves is added through its runtime API (no reload): the queued request takes it.
test(`${engine}: in-flight counts survive routing table swaps, and a queued request goes to a machine that starts while it waits`, async (t) => {
  const c = await webApp(t);
  const a = await slowBackend(t, 'a');
  const idA = await startedMachine(c, 'web', httpService(a.port, { type: 'requests', soft_limit: 1, hard_limit: 1 }));
  const proxy = await proxyOn(engine, t, c, { queueMs: 60_000 });
  const ag = agent(t);
  const held = get(ag, proxy, '/hold');
  await waitFor('the held request to land', () => a.active === 1);
  const queueLen = queueLengthOn(engine, t, proxy);
  const queued = get(ag, proxy, '/queued');
  await waitFor('the second request to wait in the queue', async () => await queueLen() === 1);
  const version = proxy.routes.version;
  await createApp(c, 'other');
  await waitFor('a swap', () => proxy.routes.version > version);
  assert.equal(await inflight(engine, proxy, idA), 1, 'the count is on the backend object that survived the swap');
  const b = await slowBackend(t, 'b');
  await startedMachine(c, 'web', httpService(b.port, { type: 'requests', soft_limit: 1, hard_limit: 1 }));
  const served = await queued;
  assert.deepEqual([served.status, served.body], [200, 'b']);
  assert.equal(await queueLen(), 0);
  assert.equal(a.hits, 1);
  a.release();
  assert.equal((await held).status, 200);
  await waitFor('the slot to be given back', async () => await inflight(engine, proxy, idA) === 0);
});
}

// Node only from here: a per-app queue bound (queuePerApp) and soft limits are the Node proxy's; HAProxy's leastconn
// has no soft limit and its queue no bound per app.
test('a full queue answers 503 over_capacity at once; a request that waits too long gets 503 over_capacity', async (t) => {
  const c = await webApp(t);
  const b = await slowBackend(t, 'a');
  await startedMachine(c, 'web', httpService(b.port, { type: 'requests', soft_limit: 1, hard_limit: 1 }));
  const proxy = await proxyFor(t, c, { queueMs: 300 }, { queuePerApp: 1 });
  const ag = agent(t);
  const held = get(ag, proxy, '/hold');
  await waitFor('the first request to reach the machine', () => b.active === 1);
  const queueLen = queueLength(t);
  const queued = get(ag, proxy, '/queued');
  await waitFor('the second request to wait in the queue', () => queueLen() === 1);
  // The queue holds one; with it taken, the next is refused without waiting.
  const refused = await get(ag, proxy, '/refused');
  assert.equal(refused.status, 503);
  assert.equal(refused.code, 'over_capacity');
  assert.match(refused.body, /every machine of app web is at its hard concurrency limit and 1 requests already wait/);
  const timedOut = await queued;
  assert.equal(queueLen(), 0);
  assert.equal(timedOut.status, 503);
  assert.equal(timedOut.code, 'over_capacity');
  assert.match(timedOut.body, /stayed at its hard concurrency limit for the 300 ms the request waited; .*services\.concurrency\.hard_limit/);
  b.release();
  assert.equal((await held).status, 200);
  assert.equal(b.hits, 1, 'refused and timed-out requests never reached the machine');
  assert.equal((await get(ag, proxy, '/after')).status, 200);
});

test('a machine below its soft limit is preferred over one above it, even with more in flight', async (t) => {
  const c = await webApp(t);
  const a = await slowBackend(t, 'a');
  const b = await slowBackend(t, 'b');
  await startedMachine(c, 'web', httpService(a.port, { type: 'requests', soft_limit: 1, hard_limit: 10 }));
  await startedMachine(c, 'web', httpService(b.port, { type: 'requests', soft_limit: 10, hard_limit: 10 }));
  const proxy = await proxyFor(t, c);
  const ag = agent(t);
  // Whichever way the first tie breaks, three held requests end as a=1 (at its soft limit) and b=2 (below its own).
  const held = [];
  for (let i = 1; i <= 3; i++) {
    held.push(get(ag, proxy, '/hold'));
    await waitFor(`held request ${i} to land`, () => a.active + b.active === i);
  }
  assert.deepEqual([a.active, b.active], [1, 2]);
  for (let i = 0; i < 10; i++) assert.equal((await get(ag, proxy, '/quick')).body, 'b');
  a.release();
  b.release();
  for (const r of await Promise.all(held)) assert.equal(r.status, 200);
});

test('Fly defaults apply when a service sets no concurrency: soft 20, hard 25', async (t) => {
  const c = await webApp(t);
  const b = await slowBackend(t, 'a');
  await startedMachine(c, 'web', httpService(b.port));
  const proxy = await proxyFor(t, c);
  const backend = proxy.routes.apps.get('web')!.backends[0]!;
  assert.deepEqual([backend.limitType, backend.softLimit, backend.hardLimit], ['connections', 20, 25]);
});
