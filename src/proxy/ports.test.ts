// Apps' own addresses against real sockets: TCP passthrough, TLS termination, PROXY protocol v1/v2, UDP, the backhaul,
// listeners following the catalog, with node servers on loopback playing machines.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { createServer as createHttpServer } from 'node:http';
import { connect, createServer, isIPv4, type AddressInfo, type Socket } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { request } from 'undici';
import type { Catalog, MachineConfig } from '../catalog/index.ts';
import { testCert } from '../../test/helpers/certs.ts';
import { freePort } from '../../test/helpers/registry.ts';
import { waitFor } from '../../test/helpers/wait.ts';
import { proxyConnectionChannel, type ProxyConnectionEvent } from './listeners.ts';
import { proxyV2Signature } from './proxy-protocol.ts';
import { createApp, proxyFor, startedMachine, tempCatalog } from './testing.ts';

type Service = NonNullable<MachineConfig['services']>[number];
const now = () => new Date().toISOString();

/** A loopback address of its own for each test (127.0.200-254.x), so tests never share a listener. */
function appAddress(): string {
  return `127.0.${200 + Math.floor(Math.random() * 55)}.${2 + Math.floor(Math.random() * 250)}`;
}

async function assign(c: Catalog, app: string, ip: string): Promise<void> {
  await c.createIpAssignment({ ip, app, type: 'v4', region: 'global', created_at: now() });
}

/** A TCP server playing a machine: `onConnection` gets every accepted socket. Returns its port. */
async function tcpMachine(t: TestContext, onConnection: (s: Socket) => void): Promise<number> {
  const sockets = new Set<Socket>();
  const server = createServer({ allowHalfOpen: true }, (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => s.destroy());
    onConnection(s);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => {
    for (const s of sockets) s.destroy();
    server.close(() => resolve());
  }));
  return (server.address() as AddressInfo).port;
}

/** A machine that answers each connection with its name, then echoes what it reads in upper case until the client ends. */
function shouting(name: string, seen: string[] = []): (s: Socket) => void {
  return (s) => {
    seen.push(name);
    s.write(`${name}:`);
    s.on('data', (d: Buffer) => s.write(d.toString().toUpperCase()));
    s.on('end', () => s.end());
  };
}

/** Connects, sends `text`, half-closes, and returns everything read until the proxy closes (or resets) the connection. */
async function converse(ip: string, port: number, text: string): Promise<string> {
  const s = connect({ host: ip, port, allowHalfOpen: true });
  let got = '';
  s.on('data', (d: Buffer) => { got += d.toString(); });
  s.on('error', () => s.destroy()); // a reset ends the conversation; what was read is the answer
  await new Promise<void>((resolve) => {
    s.once('connect', () => s.end(text));
    s.once('close', () => resolve());
  });
  return got;
}

/** True when a TCP connection to ip:port is accepted (and then closed). */
function accepts(ip: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ host: ip, port });
    s.once('connect', () => { s.destroy(); resolve(true); });
    s.once('error', () => resolve(false));
  });
}

function tcpService(internalPort: number, port: number, handlers: Service['ports'] extends Array<infer P> | undefined ? P : never = { port }): Service[] {
  return [{ protocol: 'tcp', internal_port: internalPort, ports: [{ ...handlers, port }] }];
}

/** Collects connection events for the rest of the test. */
function connectionEvents(t: TestContext): ProxyConnectionEvent[] {
  const events: ProxyConnectionEvent[] = [];
  const on = (m: unknown) => events.push(m as ProxyConnectionEvent);
  subscribe(proxyConnectionChannel, on);
  t.after(() => unsubscribe(proxyConnectionChannel, on));
  return events;
}

test('tcp passthrough: bytes both ways with half-close kept, counted per app', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'db');
  const ip = appAddress();
  const port = await freePort();
  await startedMachine(catalog, 'db', tcpService(await tcpMachine(t, shouting('m1')), port));
  const events = connectionEvents(t);
  const proxy = await proxyFor(t, catalog);
  assert.equal(await accepts(ip, port), false, 'no address yet: nothing listens');
  await assign(catalog, 'db', ip);
  await waitFor('the app address to listen', () => accepts(ip, port));
  assert.deepEqual(proxy.routes.ports.get('db')?.ips, [ip]);

  assert.equal(await converse(ip, port, 'hello'), 'm1:HELLO', 'the machine spoke first, read the client\'s bytes and its end, and answered');
  const e = await waitFor('the connection event', () => events.find((x) => x.app === 'db' && x.bytesIn === 5));
  assert.equal(e.protocol, 'tcp');
  assert.equal(e.port, port);
  assert.equal(e.bytesOut, 'm1:HELLO'.length);
  assert.equal(e.error, undefined);
  assert.equal(proxy.routes.ports.get('db')!.backends[0]!.inflight, 0, 'the slot is given back');
});

test('a listener opens when an address is assigned and closes when it is released; removed machines get no new connections', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'db');
  const ip = appAddress();
  const port = await freePort();
  const seen: string[] = [];
  const m1 = await startedMachine(catalog, 'db', tcpService(await tcpMachine(t, shouting('m1', seen)), port));
  await startedMachine(catalog, 'db', tcpService(await tcpMachine(t, shouting('m2', seen)), port));
  await assign(catalog, 'db', ip);
  await proxyFor(t, catalog);
  await waitFor('the app address to listen', () => accepts(ip, port));

  // A connection held open to m1 while m1 leaves routing keeps working.
  const held = connect({ host: ip, port });
  let heldGot = '';
  held.on('data', (d: Buffer) => { heldGot += d.toString(); });
  await waitFor('the held connection to reach a machine', () => heldGot.includes(':'));
  const heldOn = heldGot.startsWith('m1') ? 'm1' : 'm2';
  const other = heldOn === 'm1' ? 'm2' : 'm1';
  const leaving = heldOn === 'm1' ? m1 : (await catalog.listMachines({ app: 'db' })).find((m) => m.spec.id !== m1)!.spec.id;
  const spec = catalog.getMachine(leaving)!.spec;
  await catalog.updateMachineSpec({ ...spec, cordoned: true, version: spec.version + 1 }, spec.version);
  seen.length = 0;
  await waitFor('new connections to go to the other machine only', async () => (await converse(ip, port, 'x')).startsWith(other));
  seen.length = 0;
  for (let i = 0; i < 6; i++) assert.equal(await converse(ip, port, 'x'), `${other}:X`);
  assert.deepEqual(new Set(seen), new Set([other]), 'the cordoned machine got no new connection');
  held.write('still');
  await waitFor('the held connection to still relay', () => heldGot.endsWith('STILL'));
  held.destroy();

  await catalog.deleteIpAssignment(ip);
  await waitFor('the listener to close', async () => !(await accepts(ip, port)));
});

test('tls alone: the proxy terminates TLS with the app\'s certificate by SNI and relays plaintext to the machine', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'db');
  const ip = appAddress();
  const port = await freePort();
  const plain: string[] = [];
  await startedMachine(catalog, 'db', tcpService(await tcpMachine(t, (s) => {
    s.on('data', (d: Buffer) => { plain.push(d.toString()); s.end('pong'); });
  }), port, { port, handlers: ['tls'] }));
  const custom = await testCert(['db.example.com']);
  await catalog.putCertificate({
    hostname: 'db.example.com', app: 'db', source: 'custom', fullchain: custom.fullchain, private_key: custom.key, issuer: 'CN=test',
    subject: 'CN=db.example.com', not_before: now(), not_after: now(), fingerprint_sha256: '', created_at: now(),
  });
  await assign(catalog, 'db', ip);
  await proxyFor(t, catalog);
  await waitFor('the app address to listen', () => accepts(ip, port));

  const talk = (servername: string) => new Promise<{ subject: string; answer: string }>((resolve, reject) => {
    const s = tlsConnect({ host: ip, port, servername, rejectUnauthorized: false });
    let answer = '';
    s.on('data', (d: Buffer) => { answer += d.toString(); });
    s.once('error', reject);
    s.once('secureConnect', () => s.write('ping'));
    s.once('close', () => resolve({ subject: s.getPeerX509Certificate()?.subjectAltName ?? '', answer }));
    s.once('end', () => resolve({ subject: s.getPeerX509Certificate()?.subjectAltName ?? '', answer }));
  });
  const own = await talk('db.localhost');
  assert.equal(own.answer, 'pong');
  assert.match(own.subject, /DNS:db\.localhost/, 'the app\'s self-signed certificate');
  const byCustom = await talk('db.example.com');
  assert.equal(byCustom.answer, 'pong');
  assert.match(byCustom.subject, /DNS:db\.example\.com/, 'the app\'s custom certificate, picked by SNI');
  assert.deepEqual(plain, ['ping', 'ping'], 'the machine got plaintext');
});

/** What a fake machine read as a PROXY header: v1's line, or v2's parsed fields. */
interface ProxyInfo { version: 1 | 2; family: string; src: string; dst: string; srcPort: number; dstPort: number; rest: string }

/** Parses a v1 or v2 PROXY header at the start of `buf` (the test's own reading of HAProxy's spec). */
function parseProxy(buf: Buffer): ProxyInfo | undefined {
  if (buf.subarray(0, 12).equals(proxyV2Signature)) {
    if (buf.length < 16) return undefined;
    const len = buf.readUInt16BE(14);
    if (buf.length < 16 + len) return undefined;
    assert.equal(buf[12], 0x21, 'version 2, PROXY command');
    const fam = buf[13]!;
    const v4 = fam >> 4 === 1;
    const addr = (at: number) => (v4 ? [...buf.subarray(at, at + 4)].join('.') : buf.subarray(at, at + 16).toString('hex').replace(/(.{4})(?!$)/g, '$1:'));
    const a = 16;
    const n = v4 ? 4 : 16;
    return {
      version: 2, family: `${v4 ? 'inet' : 'inet6'}/${(fam & 0xf) === 1 ? 'stream' : 'dgram'}`, src: addr(a), dst: addr(a + n),
      srcPort: buf.readUInt16BE(a + 2 * n), dstPort: buf.readUInt16BE(a + 2 * n + 2), rest: buf.subarray(16 + len).toString(),
    };
  }
  const end = buf.indexOf('\r\n');
  if (end === -1) return undefined;
  const [word, family, src, dst, sp, dp] = buf.subarray(0, end).toString('latin1').split(' ');
  assert.equal(word, 'PROXY');
  return { version: 1, family: family!, src: src!, dst: dst!, srcPort: Number(sp), dstPort: Number(dp), rest: buf.subarray(end + 2).toString() };
}

/** A machine that reads a PROXY header and then "hello", records the header, and answers `reply` and closes. */
function proxyReading(got: ProxyInfo[], reply: string, banner = ''): (s: Socket) => void {
  return (s) => {
    if (banner) s.write(banner);
    let buf = Buffer.alloc(0);
    s.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      const info = parseProxy(buf);
      if (info !== undefined && info.rest === 'hello') {
        got.push(info);
        s.end(reply);
      }
    });
  };
}

for (const version of ['v1', 'v2'] as const) {
  test(`proxy_proto ${version}: the machine reads the client's address and port, then the client's bytes`, async (t) => {
    const catalog = await tempCatalog(t);
    await createApp(catalog, 'db');
    const ip = appAddress();
    const port = await freePort();
    const got: ProxyInfo[] = [];
    await startedMachine(catalog, 'db', tcpService(await tcpMachine(t, proxyReading(got, 'ok')), port, { port, handlers: ['proxy_proto'], proxy_proto_options: { version } }));
    await assign(catalog, 'db', ip);
    await proxyFor(t, catalog);
    await waitFor('the app address to listen', () => accepts(ip, port));

    const client = connect({ host: ip, port, localAddress: '127.0.0.9' });
    await new Promise<void>((resolve) => client.once('connect', resolve));
    const clientPort = client.localPort!;
    client.write('hello');
    await new Promise<void>((resolve) => client.once('close', () => resolve()).resume());
    assert.equal(got.length, 1);
    const info = got[0]!;
    assert.equal(info.version, version === 'v1' ? 1 : 2);
    assert.equal(info.family, version === 'v1' ? 'TCP4' : 'inet/stream');
    assert.equal(info.src, '127.0.0.9', 'the client\'s address');
    assert.equal(info.srcPort, clientPort, 'the client\'s port');
    assert.equal(info.dst, ip, 'the app address the client connected to');
    assert.equal(info.dstPort, port);
    assert.ok(isIPv4(info.src));
  });
}

test('udp: datagrams reach the machine and its replies reach each client, one flow per client', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'dns');
  const ip = appAddress();
  const port = await freePort();
  const machine = createSocket('udp4');
  const senders = new Set<string>();
  machine.on('message', (msg, rinfo) => {
    senders.add(`${rinfo.address}:${rinfo.port}`);
    machine.send(Buffer.from(`echo ${msg.toString()}`), rinfo.port, rinfo.address);
  });
  await new Promise<void>((resolve) => machine.bind(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => machine.close(() => resolve())));
  await startedMachine(catalog, 'dns', [{ protocol: 'udp', internal_port: machine.address().port, ports: [{ port }] }]);
  await assign(catalog, 'dns', ip);
  const events = connectionEvents(t);
  const proxy = await proxyFor(t, catalog);

  const client = async (): Promise<UdpSocket> => {
    const c = createSocket('udp4');
    await new Promise<void>((resolve) => c.bind(0, '127.0.0.1', resolve));
    t.after(() => c.close());
    return c;
  };
  const ask = (c: UdpSocket, text: string) => new Promise<string>((resolve) => {
    const timer = setInterval(() => c.send(text, port, ip), 200); // UDP: resend until the listener is up
    c.once('message', (m) => { clearInterval(timer); resolve(m.toString()); });
    c.send(text, port, ip);
  });
  const a = await client();
  const b = await client();
  assert.equal(await ask(a, 'one'), 'echo one');
  assert.equal(await ask(b, 'two'), 'echo two');
  assert.equal(await ask(a, 'three'), 'echo three');
  assert.equal(senders.size, 2, 'each client is its own flow (its own socket to the machine)');
  const backend = proxy.routes.ports.get('dns')!.backends[0]!;
  assert.equal(backend.protocol, 'udp');
  assert.equal(backend.inflight, 2, 'each live flow counts against the machine\'s limit');
  await proxy.close();
  const flows = events.filter((e) => e.app === 'dns' && e.protocol === 'udp' && e.error === undefined);
  assert.equal(flows.length, 2, 'closing the proxy ends the flows');
  assert.ok(flows.every((f) => f.bytesIn > 0 && f.bytesOut > 0));
});

test('tls + http on an app port takes the HTTP path to the app, whatever the Host', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'web');
  const ip = appAddress();
  const port = await freePort();
  const http = createHttpServer((req, res) => res.end(`web saw ${req.headers['x-forwarded-proto']}`));
  await new Promise<void>((resolve) => http.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => { http.closeAllConnections(); http.close(() => resolve()); }));
  await startedMachine(catalog, 'web', [{
    protocol: 'tcp', internal_port: (http.address() as AddressInfo).port,
    ports: [{ port: 80, handlers: ['http'] }, { port, handlers: ['tls', 'http'] }],
  }]);
  await assign(catalog, 'web', ip);
  await proxyFor(t, catalog, {}, {}, { https: { host: '127.0.0.1', port: 0 } });
  await waitFor('the app address to listen', () => accepts(ip, port));
  const { Agent } = await import('undici');
  const dispatcher = new Agent({ connect: { rejectUnauthorized: false } });
  t.after(() => dispatcher.close());
  const res = await request(`https://${ip}:${port}/`, { dispatcher, headers: { host: 'anything.example' } });
  assert.equal(res.statusCode, 200);
  assert.equal(await res.body.text(), 'web saw https');
});

test('an edge relays tcp to a machine on another host through that host\'s backhaul, PROXY header included', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'db');
  const backhaulPort = await freePort();
  await catalog.putHost({ id: 'edge1', region: 'ams', roles: ['edge'], host_number: 2, cpus: 2, memory_mb: 4096, address: '127.0.0.1', updated_at: now() });
  await catalog.putHost({
    id: 'worker1', region: 'ams', roles: ['worker'], host_number: 3, cpus: 2, memory_mb: 4096, address: '127.0.0.1', updated_at: now(),
    backhaul: `127.0.0.1:${backhaulPort}`,
  });
  const ip = appAddress();
  const port = await freePort();
  const got: ProxyInfo[] = [];
  // The machine speaks first: its banner must cross the tunnel's answer intact.
  const machine = await tcpMachine(t, proxyReading(got, 'bye', 'banner;'));
  await startedMachine(catalog, 'db', tcpService(machine, port, { port, handlers: ['proxy_proto'], proxy_proto_options: { version: 'v2' } }), { host: 'worker1', region: 'ams' });
  await assign(catalog, 'db', ip);
  await proxyFor(t, catalog, {}, {}, { hostId: 'worker1', backhaul: { host: '127.0.0.1', port: backhaulPort }, appAddresses: false });
  const edge = await proxyFor(t, catalog, {}, {}, { hostId: 'edge1', region: 'ams' });
  assert.equal(edge.routes.ports.get('db')?.backends[0]?.via, 'worker1');
  await waitFor('the app address to listen', () => accepts(ip, port));

  const answer = await converse(ip, port, 'hello');
  assert.equal(answer, 'banner;bye');
  assert.equal(got.length, 1);
  assert.equal(got[0]!.src, '127.0.0.1', 'the client\'s address, as the edge saw it');
  assert.equal(got[0]!.dst, ip);

  // The worker's backhaul opens tunnels only to its own machines' service ports.
  const refused = await new Promise<string>((resolve) => {
    const s = connect({ host: '127.0.0.1', port: backhaulPort });
    let text = '';
    s.on('data', (d: Buffer) => { text += d.toString(); });
    s.once('connect', () => s.write('CONNECT nosuchmachine:22 HTTP/1.1\r\nhost: nosuchmachine:22\r\n\r\n'));
    s.once('close', () => resolve(text));
  });
  assert.match(refused, /^HTTP\/1\.1 503 /);
  assert.match(refused, /tarmac-proxy-error: no_machine/);
});

test('connections count against the hard limit (one over it is closed) and a machine that refuses is skipped for another', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'db');
  const ip = appAddress();
  const port = await freePort();
  const dead = await freePort(); // nothing listens there: connecting is refused
  const limited = (internal: number): Service[] => [{ protocol: 'tcp', internal_port: internal, ports: [{ port }], concurrency: { type: 'connections', soft_limit: 1, hard_limit: 1 } }];
  await startedMachine(catalog, 'db', limited(dead));
  await startedMachine(catalog, 'db', limited(await tcpMachine(t, shouting('live'))));
  await assign(catalog, 'db', ip);
  const events = connectionEvents(t);
  const proxy = await proxyFor(t, catalog);
  await waitFor('the app address to listen', () => accepts(ip, port));
  await waitFor('the probe connections to be counted', () => events.length >= 1);
  events.length = 0;

  for (let i = 0; i < 4; i++) assert.equal(await converse(ip, port, 'x'), 'live:X', 'the refusing machine is passed over');
  assert.equal(proxy.routes.ports.get('db')!.backends.every((b) => b.inflight === 0), true);

  // One connection held open takes the live machine's only slot; the dead one is still tried and refuses.
  const held = connect({ host: ip, port });
  let heldGot = '';
  held.on('data', (d: Buffer) => { heldGot += d.toString(); });
  t.after(() => held.destroy());
  await waitFor('the held connection to reach the machine', () => heldGot === 'live:');
  assert.equal(await converse(ip, port, 'y'), '', 'no machine with room: the connection is closed');
  const refused = await waitFor('the refused connection\'s event', () => events.find((e) => e.error !== undefined));
  assert.equal(refused.error, 'backend_unreachable', 'the machine with room refused, the other is at its hard limit');
  held.destroy();
  await waitFor('the held connection\'s slot to be given back', () => proxy.routes.ports.get('db')!.backends.every((b) => b.inflight === 0));
  assert.equal(await converse(ip, port, 'z'), 'live:Z');
});

test('a udp flow ends after its idle time and gives its slot back', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'dns');
  const ip = appAddress();
  const port = await freePort();
  const machine = createSocket('udp4');
  machine.on('message', (msg, rinfo) => machine.send(msg, rinfo.port, rinfo.address));
  await new Promise<void>((resolve) => machine.bind(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => machine.close(() => resolve())));
  await startedMachine(catalog, 'dns', [{ protocol: 'udp', internal_port: machine.address().port, ports: [{ port }] }]);
  await assign(catalog, 'dns', ip);
  const events = connectionEvents(t);
  const proxy = await proxyFor(t, catalog, { udpIdleMs: 300 });
  const c = createSocket('udp4');
  t.after(() => c.close());
  const echoed = new Promise<string>((resolve) => c.once('message', (m) => resolve(m.toString())));
  const timer = setInterval(() => c.send('ping', port, ip), 100);
  t.after(() => clearInterval(timer));
  assert.equal(await echoed, 'ping');
  clearInterval(timer);
  const flow = await waitFor('the flow to end when idle', () => events.find((e) => e.app === 'dns' && e.error === undefined));
  assert.equal(flow.protocol, 'udp');
  assert.ok(flow.bytesIn >= 4 && flow.bytesOut >= 4);
  assert.equal(proxy.routes.ports.get('dns')!.backends[0]!.inflight, 0);
});

test('an IPv6 app address: the listener and the v1 PROXY header speak IPv6', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'db');
  const port = await freePort();
  const got: ProxyInfo[] = [];
  await startedMachine(catalog, 'db', tcpService(await tcpMachine(t, proxyReading(got, 'ok')), port, { port, handlers: ['proxy_proto'] }));
  await catalog.createIpAssignment({ ip: '::1', app: 'db', type: 'v6', region: 'global', created_at: now() });
  await proxyFor(t, catalog);
  await waitFor('the app address to listen', () => accepts('::1', port));
  assert.equal(await converse('::1', port, 'hello'), 'ok');
  const info = await waitFor('the header', () => got.find((g) => g.rest === 'hello'));
  assert.equal(info.family, 'TCP6');
  assert.equal(info.src, '::1');
  assert.equal(info.dst, '::1');
  assert.equal(info.dstPort, port);
});
