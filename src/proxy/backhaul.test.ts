// Backhaul and routing headers against real sockets: an edge proxy forwarding to a worker's proxy over its backhaul
// listener, Fly-Force-Instance-Id, Fly-Prefer-Region and fly-replay, with node:http servers playing machines.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import { connect, type AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import { request } from 'undici';
import * as grpc from '@grpc/grpc-js';
import { echo, EchoClient, grpcBackend } from '../../test/helpers/grpc.ts';
import type { Catalog } from '../catalog/index.ts';
import type { ProxyOptions, RunningProxy } from './proxy.ts';
import { createApp, httpService, proxyFor, queueLength, startedMachine, tempCatalog } from './testing.ts';
import { waitFor } from '../../test/helpers/wait.ts';
import { freePort } from '../../test/helpers/registry.ts';

const now = () => new Date().toISOString();

interface Seen { machine: string; headers: IncomingHttpHeaders }

/** A node:http server playing machine `name`: answers its name and records the headers it got. */
async function fakeMachine(t: TestContext, name: string, seen: Seen[], hold?: Promise<void>): Promise<number> {
  const server: Server = createServer((req, res) => {
    seen.push({ machine: name, headers: req.headers });
    void (hold ?? Promise.resolve()).then(() => res.end(name));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => {
    server.closeAllConnections();
    server.close(() => resolve());
  }));
  return (server.address() as AddressInfo).port;
}

async function addHost(c: Catalog, id: string, region: string, backhaul?: number): Promise<void> {
  await c.putHost({
    id, region, roles: ['edge', 'worker'], host_number: id.length, cpus: 2, memory_mb: 4096, address: '127.0.0.1', updated_at: now(),
    ...(backhaul === undefined ? {} : { backhaul: `127.0.0.1:${backhaul}` }),
  });
}

/**
 * An app on a catalog with two registered hosts in region ams: `edge1`, and `worker1` taking backhaul on a free
 * port. `start` runs both hosts' proxies (after the test has placed its machines on worker1).
 */
async function twoHosts(t: TestContext, app: string): Promise<{
  catalog: Catalog; backhaulPort: number; start(more?: Partial<ProxyOptions>): Promise<{ edge: RunningProxy; worker: RunningProxy }>;
}> {
  const catalog = await tempCatalog(t);
  await createApp(catalog, app);
  const backhaulPort = await freePort();
  await addHost(catalog, 'edge1', 'ams');
  await addHost(catalog, 'worker1', 'ams', backhaulPort);
  return {
    catalog,
    backhaulPort,
    async start(more = {}) {
      const worker = await proxyFor(t, catalog, {}, {}, { hostId: 'worker1', backhaul: { host: '127.0.0.1', port: backhaulPort }, region: 'ams' });
      const edge = await proxyFor(t, catalog, {}, {}, { hostId: 'edge1', region: 'ams', ...more });
      return { edge, worker };
    },
  };
}

async function get(port: number, app: string, headers: Record<string, string> = {}): Promise<{ status: number; body: string; headers: Record<string, unknown> }> {
  const res = await request(`http://127.0.0.1:${port}/`, { headers: { host: `${app}.localhost`, ...headers } });
  return { status: res.statusCode, body: await res.body.text(), headers: res.headers };
}

test('an edge forwards to the machine\'s host over its backhaul; the worker delivers with the edge\'s forwarding headers', async (t) => {
  const { catalog, backhaulPort, start } = await twoHosts(t, 'web');
  const seen: Seen[] = [];
  const id = await startedMachine(catalog, 'web', httpService(await fakeMachine(t, 'w1', seen)), { host: 'worker1', region: 'ams' });
  const { edge, worker } = await start();
  assert.deepEqual(worker.backhaulAddress, { host: '127.0.0.1', port: backhaulPort });
  const backends = edge.routes.apps.get('web')!.backends;
  assert.equal(backends.length, 1);
  assert.equal(backends[0]!.via, 'worker1', 'the edge reaches the remote machine through its host');
  assert.equal(backends[0]!.origin, `http://127.0.0.1:${backhaulPort}`);

  const res = await get(edge.address.port, 'web', { 'x-forwarded-for': '203.0.113.9', 'fly-client-ip': '198.51.100.1' });
  assert.equal(res.status, 200);
  assert.equal(res.body, 'w1');
  assert.equal(seen.length, 1);
  const h = seen[0]!.headers;
  assert.equal(h['fly-client-ip'], '127.0.0.1', 'the edge sets the client address; the worker keeps it');
  assert.equal(h['x-forwarded-for'], '203.0.113.9, 127.0.0.1', 'one hop of forwarding, added by the edge only');
  assert.equal(h['fly-forwarded-port'], String(edge.address.port), 'the port the client connected to, not the backhaul port');
  assert.equal(h['fly-request-id'], res.headers['fly-request-id'], 'one request id end to end');
  assert.equal(h['fly-force-instance-id'], undefined, 'the backhaul instruction is not passed to the machine');
  assert.equal(typeof res.headers['fly-request-id'], 'string', 'exactly one fly-request-id in the response');
  assert.deepEqual(res.headers['via'], ['1.1 tarmac', '1.1 tarmac'], 'both proxies are named in Via');

  // The worker's backhaul takes only requests that name one of its own started machines.
  const direct = await request(`http://127.0.0.1:${backhaulPort}/`, { headers: { host: 'web.localhost' } });
  assert.equal(direct.statusCode, 400);
  assert.match(await direct.body.text(), /Fly-Force-Instance-Id/);
  const other = await request(`http://127.0.0.1:${backhaulPort}/`, { headers: { host: 'web.localhost', 'fly-force-instance-id': 'nosuchmachine' } });
  assert.equal(other.statusCode, 503);
  assert.equal(other.headers['tarmac-proxy-error'], 'no_machine');
  await other.body.text();
  const named = await request(`http://127.0.0.1:${backhaulPort}/`, { headers: { host: 'web.localhost', 'fly-force-instance-id': id } });
  assert.equal(named.statusCode, 200);
  assert.equal(await named.body.text(), 'w1');
});

test('the worker enforces a machine\'s hard limit over requests from its own edge and from the backhaul together', async (t) => {
  const { catalog, start } = await twoHosts(t, 'web');
  const seen: Seen[] = [];
  let release!: () => void;
  const hold = new Promise<void>((resolve) => { release = resolve; });
  await startedMachine(catalog, 'web', httpService(await fakeMachine(t, 'w1', seen, hold), { type: 'requests', soft_limit: 1, hard_limit: 1 }), { host: 'worker1', region: 'ams' });
  const { edge, worker } = await start();

  const queued = queueLength(t);
  const viaWorker = get(worker.address.port, 'web');
  await waitFor('the first request to reach the machine', () => seen.length === 1);
  const viaEdge = get(edge.address.port, 'web');
  // The second request reaches the worker over the backhaul and waits there: the machine is at its hard limit.
  await waitFor('the backhaul request to queue at the worker', () => queued() === 1);
  assert.equal(seen.length, 1, 'the machine never has more than its hard limit in flight');
  release();
  const [a, b] = await Promise.all([viaWorker, viaEdge]);
  assert.equal(a.status, 200);
  assert.equal(b.status, 200);
  assert.equal(seen.length, 2);
});

test('Fly-Force-Instance-Id picks the machine; Fly-Prefer-Region picks the region; the proxy\'s region wins ties', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'web');
  const seen: Seen[] = [];
  const ams = await startedMachine(catalog, 'web', httpService(await fakeMachine(t, 'ams', seen)), { region: 'ams' });
  const ord = await startedMachine(catalog, 'web', httpService(await fakeMachine(t, 'ord', seen)), { region: 'ord' });
  const proxy = await proxyFor(t, catalog, {}, {}, { region: 'ams' });

  for (let i = 0; i < 5; i++) assert.equal((await get(proxy.address.port, 'web')).body, 'ams', 'idle machines: the one in the proxy\'s region');
  for (let i = 0; i < 5; i++) assert.equal((await get(proxy.address.port, 'web', { 'fly-prefer-region': 'ord' })).body, 'ord');
  for (let i = 0; i < 5; i++) assert.equal((await get(proxy.address.port, 'web', { 'fly-force-instance-id': ord })).body, 'ord');
  assert.equal((await get(proxy.address.port, 'web', { 'fly-force-instance-id': ams })).body, 'ams');
  assert.ok(seen.every((s) => s.headers['fly-force-instance-id'] === undefined && s.headers['fly-prefer-region'] === undefined));

  const missing = await get(proxy.address.port, 'web', { 'fly-force-instance-id': 'nosuchmachine' });
  assert.equal(missing.status, 503);
  assert.equal(missing.headers['tarmac-proxy-error'], 'no_machine');
  assert.match(missing.body, /nosuchmachine/);
  // A region with no machine falls back to the others.
  assert.equal((await get(proxy.address.port, 'web', { 'fly-prefer-region': 'syd' })).status, 200);
});

test('a WebSocket upgrade crosses the backhaul to the machine', async (t) => {
  const { catalog, start } = await twoHosts(t, 'ws');
  const upgrades: IncomingHttpHeaders[] = [];
  const tunnels: Duplex[] = [];
  const server = createServer();
  server.on('upgrade', (req, socket: Duplex) => {
    upgrades.push(req.headers);
    tunnels.push(socket);
    socket.write('HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n');
    socket.pipe(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => {
    for (const s of tunnels) s.destroy(); // upgraded sockets are no longer the server's to close
    server.closeAllConnections();
    server.close(() => resolve());
  }));
  await startedMachine(catalog, 'ws', httpService((server.address() as AddressInfo).port), { host: 'worker1', region: 'ams' });
  const { edge } = await start();

  const socket = connect(edge.address.port, '127.0.0.1');
  t.after(() => socket.destroy());
  socket.write('GET /chat HTTP/1.1\r\nhost: ws.localhost\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n');
  let got = '';
  socket.on('data', (d: Buffer) => { got += d.toString('latin1'); });
  await waitFor('the 101 answer', () => got.includes('\r\n\r\n'));
  assert.match(got, /^HTTP\/1\.1 101 /);
  socket.write('ping over two proxies');
  await waitFor('the echo', () => got.endsWith('ping over two proxies'));
  assert.equal(upgrades.length, 1);
  assert.equal(upgrades[0]!['fly-client-ip'], '127.0.0.1');
  assert.equal(upgrades[0]!['fly-force-instance-id'], undefined);
});

test('gRPC crosses the backhaul: HTTP/2 from the client, h2c from the edge to the worker and from the worker to the machine', async (t) => {
  const { catalog, start } = await twoHosts(t, 'rpc');
  const seen: grpc.Metadata[] = [];
  const grpcPort = await grpcBackend(t, seen);
  await startedMachine(catalog, 'rpc', [{
    protocol: 'tcp', internal_port: grpcPort, ports: [{ port: 80, handlers: ['http'], http_options: { h2_backend: true } }],
  }], { host: 'worker1', region: 'ams' });
  const { edge } = await start({ https: { host: '127.0.0.1', port: 0 } });
  assert.equal(edge.routes.apps.get('rpc')!.backends[0]!.h2, true, 'the edge speaks h2c to the worker for an h2 service');

  // The self-signed default for rpc.localhost: the test trusts it by skipping verification (it checks routing, not PKI).
  const client = new EchoClient(`127.0.0.1:${edge.httpsAddress!.port}`, grpc.credentials.createSsl(null, null, null, { rejectUnauthorized: false }), {
    'grpc.ssl_target_name_override': 'rpc.localhost', 'grpc.default_authority': 'rpc.localhost',
  });
  t.after(() => client.close());
  for (let i = 0; i < 3; i++) {
    const { reply, trailer } = await echo(client, `hello ${i}`);
    assert.equal(reply.toString(), `echo():hello ${i}`);
    assert.deepEqual(trailer.get('x-echo-trailer'), [`len=${`hello ${i}`.length}`], 'trailers cross both hops');
  }
  assert.equal(seen.length, 3);
  assert.equal(seen[0]!.get('fly-force-instance-id').length, 0, 'the backhaul instruction is not passed to the machine');
  assert.equal(seen[0]!.get('x-forwarded-proto')[0], 'https', 'the edge\'s forwarding headers reach the machine');
});

test('fly-replay: a machine sends a request on to a region, an instance or any other machine; the target learns where from', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'rep');
  const seen: Seen[] = [];
  /** A machine that answers `fly-replay: <value of ?replay=>` when asked to, else its name. */
  const replaying = async (name: string): Promise<number> => {
    const server: Server = createServer((req, res) => {
      seen.push({ machine: name, headers: req.headers });
      const want = new URL(req.url ?? '/', 'http://x').searchParams.get(`replay-${name}`);
      if (want !== null) res.writeHead(409, { 'fly-replay': want }).end('replay me');
      else res.end(name);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    t.after(() => new Promise<void>((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    }));
    return (server.address() as AddressInfo).port;
  };
  const ams = await startedMachine(catalog, 'rep', httpService(await replaying('ams')), { region: 'ams' });
  const ord = await startedMachine(catalog, 'rep', httpService(await replaying('ord')), { region: 'ord' });
  const proxy = await proxyFor(t, catalog, {}, {}, { region: 'ams' });
  const at = (query: string) => request(`http://127.0.0.1:${proxy.address.port}/?${query}`, { headers: { host: 'rep.localhost' } })
    .then(async (r) => ({ status: r.statusCode, body: await r.body.text(), headers: r.headers }));

  // The proxy's region (ams) serves first; that machine replays to ord, whose answer the client gets.
  seen.length = 0;
  const toRegion = await at('replay-ams=region%3Dord%3Bstate%3Dcart-42');
  assert.equal(toRegion.status, 200);
  assert.equal(toRegion.body, 'ord');
  assert.equal(toRegion.headers['fly-replay'], undefined, 'the replay instruction is not relayed to the client');
  const src = String(seen.find((s) => s.machine === 'ord')?.headers['fly-replay-src']);
  assert.match(src, new RegExp(`^instance=${ams};region=ams;t=\\d+;state=cart-42$`), 'the target learns where the request was replayed from');
  // By instance, and elsewhere.
  assert.equal((await at(`replay-ams=instance%3D${ord}`)).body, 'ord');
  assert.equal((await at('replay-ams=elsewhere%3Dtrue')).body, 'ord');
  // A replay to a region with no machine: a clear 503.
  const nowhere = await at('replay-ams=region%3Dsyd');
  assert.equal(nowhere.status, 503);
  assert.equal(nowhere.headers['tarmac-proxy-error'], 'no_machine');
  assert.match(nowhere.body, /region syd/);
  // Machines replaying back and forth end after a few replays, with the last machine's own answer.
  const loop = await at('replay-ams=instance%3D' + ord + `&replay-ord=instance%3D${ams}`);
  assert.equal(loop.status, 409);
  assert.equal(loop.body, 'replay me');
  // A request with a body is never replayed (its body is on its way to the first machine): its answer is relayed.
  const posted = await request(`http://127.0.0.1:${proxy.address.port}/?replay-ams=region%3Dord`, { method: 'POST', body: 'data', headers: { host: 'rep.localhost' } });
  assert.equal(posted.statusCode, 409);
  assert.equal(posted.headers['fly-replay'], 'region=ord');
  await posted.body.text();
});
