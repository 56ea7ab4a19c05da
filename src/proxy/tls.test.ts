// The TLS listener against real sockets: SNI picks custom or self-signed certificates, changes apply live, TLS < 1.2 refused, h2 and http/1.1 by ALPN.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, X509Certificate } from 'node:crypto';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { request as httpsRequest, type RequestOptions } from 'node:https';
import { createServer as createHttpServer, type IncomingMessage, type Server } from 'node:http';
import { connect as h2connect, type ClientHttp2Session } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect, type ConnectionOptions, type PeerCertificate } from 'node:tls';
import { certificateFromPem, isCertificateProblem, type Catalog } from '../catalog/index.ts';
import { testCa, testCert, type TestCa } from '../../test/helpers/certs.ts';
import { waitFor } from '../../test/helpers/wait.ts';
import { startProxyCluster } from './cluster.ts';
import { proxyMetrics, trackProxyMetrics } from './metrics.ts';
import { silentLogger } from '../shared/log.ts';
import type { RunningProxy } from './proxy.ts';
import { createApp, httpService, proxyFor, startedMachine, tempCatalog } from './testing.ts';
import { proxyTlsChannel, type ProxyTlsEvent } from './tls.ts';


/** A backend that answers with what it saw: the request's host, forwarding headers, method and body size. */
async function echoBackend(t: TestContext): Promise<Server> {
  const server = createHttpServer((req: IncomingMessage, res) => {
    if (req.url === '/echo') {
      res.writeHead(200, { 'content-type': 'application/octet-stream' });
      req.pipe(res);
      return;
    }
    let size = 0;
    req.on('data', (c: Buffer) => { size += c.length; });
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ host: req.headers.host, proto: req.headers['x-forwarded-proto'], port: req.headers['x-forwarded-port'], size, cookie: req.headers.cookie }));
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.after(() => new Promise<void>((r) => server.close(() => r())));
  return server;
}

interface Env {
  catalog: Catalog;
  proxy: RunningProxy;
  port: number;
  ca: TestCa;
  dir: string;
}

async function setup(t: TestContext, dir?: string): Promise<Env> {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'web');
  const backend = await echoBackend(t);
  await startedMachine(catalog, 'web', httpService((backend.address() as AddressInfo).port));
  const certDir = dir ?? await mkdtemp(join(tmpdir(), 'tarmac-tls-'));
  if (dir === undefined) t.after(() => rm(certDir, { recursive: true, force: true }));
  const proxy = await proxyFor(t, catalog, {}, {}, { https: { host: '127.0.0.1', port: 0 }, certificatesDir: certDir });
  return { catalog, proxy, port: proxy.httpsAddress!.port, ca: await testCa(), dir: certDir };
}

async function addCert(env: Pick<Env, 'catalog' | 'ca'>, app: string, hostname: string): Promise<string> {
  const c = await testCert([hostname], { ca: env.ca });
  const row = certificateFromPem({ hostname, app, source: 'custom', fullchain: c.fullchain, private_key: c.key });
  assert.ok(!isCertificateProblem(row), JSON.stringify(row));
  await env.catalog.putCertificate(row);
  return row.fingerprint_sha256;
}

/** The certificate a handshake with `servername` gets, and the negotiated version. */
function handshake(port: number, opts: ConnectionOptions = {}): Promise<{ cert: PeerCertificate; version: string | null; authorized: boolean }> {
  return new Promise((resolve, reject) => {
    const s = tlsConnect({ host: '127.0.0.1', port, rejectUnauthorized: false, ...opts }, () => {
      const out = { cert: s.getPeerCertificate(), version: s.getProtocol(), authorized: s.authorized };
      s.end();
      resolve(out);
    });
    s.on('error', reject);
  });
}

/** GET over HTTP/1.1 through TLS; the body parsed as JSON when it is. */
function get11(port: number, host: string, ca: string | undefined, path = '/'): Promise<{ status: number; body: string; alpn: string | false | null }> {
  return new Promise((resolve, reject) => {
    // node:https hands ALPNProtocols on to tls.connect (its types leave it out).
    const options: RequestOptions & { ALPNProtocols: string[] } = {
      host: '127.0.0.1', port, path, servername: host, headers: { host }, ALPNProtocols: ['http/1.1'], agent: false,
      ...(ca ? { ca } : { rejectUnauthorized: false }),
    };
    const req = httpsRequest(options, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => { body += c; });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body, alpn: (res.socket as import('node:tls').TLSSocket).alpnProtocol }));
    });
    req.on('error', reject);
    req.end();
  });
}

function h2session(t: TestContext, port: number, servername: string, ca?: string): ClientHttp2Session {
  const s = h2connect(`https://127.0.0.1:${port}`, { servername, ...(ca ? { ca } : { rejectUnauthorized: false }) });
  t.after(() => s.close());
  return s;
}

test('SNI picks the custom certificate, <app>.localhost gets a self-signed one kept in the data dir, others the default', async (t) => {
  const env = await setup(t);
  const fp = await addCert(env, 'web', 'www.example.com');
  const custom = await handshake(env.port, { servername: 'www.example.com', ca: env.ca.cert, rejectUnauthorized: true });
  assert.ok(custom.authorized, 'the chain verifies against the test CA');
  assert.equal(custom.cert.fingerprint256, fp);

  const own = await handshake(env.port, { servername: 'web.localhost' });
  assert.equal(own.cert.subject.CN, 'web.localhost');
  assert.equal(own.cert.issuer.CN, 'web.localhost', 'self-signed');
  assert.equal((await handshake(env.port, { servername: 'web.localhost' })).cert.fingerprint256, own.cert.fingerprint256, 'generated once, then cached');
  assert.ok((await readdir(env.dir)).includes('web.localhost.pem'));

  const unknown = await handshake(env.port, { servername: 'nothing.example.net' });
  assert.equal(unknown.cert.subject.CN, '*.localhost', 'a name nothing covers gets the default certificate');
  assert.equal((await handshake(env.port, { servername: 'ghost.localhost' })).cert.subject.CN, '*.localhost', 'no app, no certificate of its own');
  const noSni = await handshake(env.port);
  assert.equal(noSni.cert.subject.CN, '*.localhost');

  // The custom host name routes to its app, with the HTTPS forwarding headers.
  const res = await get11(env.port, 'www.example.com', env.ca.cert);
  assert.equal(res.status, 200, res.body);
  const seen = JSON.parse(res.body) as { host: string; proto: string; port: string };
  assert.deepEqual([seen.host, seen.proto, seen.port], ['www.example.com', 'https', String(env.port)]);

  // Another proxy over the same data dir serves the same self-signed certificate.
  await env.proxy.close();
  const again = await proxyFor(t, env.catalog, {}, {}, { https: { host: '127.0.0.1', port: 0 }, certificatesDir: env.dir });
  assert.equal((await handshake(again.httpsAddress!.port, { servername: 'web.localhost' })).cert.fingerprint256, own.cert.fingerprint256);
});

test('certificates added and removed in the catalog apply to the next handshake and route, without a restart', async (t) => {
  const env = await setup(t);
  assert.equal((await handshake(env.port, { servername: 'shop.example.com' })).cert.subject.CN, '*.localhost');
  assert.equal((await get11(env.port, 'shop.example.com', undefined)).status, 404, 'no app at that host yet');

  const fp = await addCert(env, 'web', 'shop.example.com');
  await waitFor('the new certificate is served', async () => (await handshake(env.port, { servername: 'shop.example.com' })).cert.fingerprint256 === fp);
  const routed = await get11(env.port, 'shop.example.com', env.ca.cert);
  assert.equal(routed.status, 200);
  assert.equal((JSON.parse(routed.body) as { host: string }).host, 'shop.example.com');

  // Renewed: the next handshake gets the new one.
  const renewed = await addCert(env, 'web', 'shop.example.com');
  await waitFor('the renewed certificate is served', async () => (await handshake(env.port, { servername: 'shop.example.com' })).cert.fingerprint256 === renewed);

  await env.catalog.deleteCertificate('shop.example.com');
  await waitFor('the default certificate is back', async () => (await handshake(env.port, { servername: 'shop.example.com' })).cert.subject.CN === '*.localhost');
  assert.equal((await get11(env.port, 'shop.example.com', undefined)).status, 404, 'the host name no longer routes');

  // A wildcard covers one label.
  const wild = await testCert(['*.example.org'], { ca: env.ca });
  const row = certificateFromPem({ hostname: '*.example.org', app: 'web', source: 'custom', fullchain: wild.fullchain, private_key: wild.key });
  assert.ok(!isCertificateProblem(row));
  await env.catalog.putCertificate(row);
  await waitFor('the wildcard is served', async () => (await handshake(env.port, { servername: 'a.example.org' })).cert.fingerprint256 === row.fingerprint_sha256);
  assert.equal((await get11(env.port, 'b.example.org', env.ca.cert)).status, 200);
});

test('TLS 1.0 and 1.1 are refused, 1.2 and 1.3 accepted; handshakes are timed and failures counted', async (t) => {
  const env = await setup(t);
  const untrack = trackProxyMetrics(env.proxy);
  t.after(untrack);
  const events: ProxyTlsEvent[] = [];
  const onTls = (m: unknown) => events.push(m as ProxyTlsEvent);
  subscribe(proxyTlsChannel, onTls);
  t.after(() => unsubscribe(proxyTlsChannel, onTls));

  for (const version of ['TLSv1', 'TLSv1.1'] as const) {
    await assert.rejects(
      handshake(env.port, { servername: 'web.localhost', minVersion: version, maxVersion: version, ciphers: 'DEFAULT@SECLEVEL=0' }),
      (e: Error & { code?: string }) => /PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL|WRONG_VERSION/i.test(`${e.code} ${e.message}`),
      `${version} must be refused`,
    );
  }
  assert.equal((await handshake(env.port, { servername: 'web.localhost', maxVersion: 'TLSv1.2' })).version, 'TLSv1.2');
  assert.equal((await handshake(env.port, { servername: 'web.localhost', minVersion: 'TLSv1.3' })).version, 'TLSv1.3');

  await waitFor('both refusals were reported', () => events.filter((e) => e.failure === 'protocol_version').length === 2);
  // The server finishes a TLS 1.3 handshake just after the client does.
  await waitFor('the TLS 1.3 handshake was timed', () => events.some((e) => e.failure === undefined && e.version === 'TLSv1.3' && e.durationMs !== undefined && e.durationMs > 0));
  const text = await proxyMetrics.metrics();
  assert.match(text, /tarmac_proxy_tls_handshake_failures_total\{reason="protocol_version"\} [1-9]/);
  assert.match(text, /tarmac_proxy_tls_handshake_seconds_count\{version="TLSv1.3"\} [1-9]/);
});

test('one port serves h2 and http/1.1 by ALPN, with the same routing and headers', async (t) => {
  const env = await setup(t);
  const h11 = await get11(env.port, 'web.localhost', undefined);
  assert.equal(h11.alpn, 'http/1.1');
  assert.equal(h11.status, 200);
  assert.equal((JSON.parse(h11.body) as { proto: string }).proto, 'https');

  const session = h2session(t, env.port, 'web.localhost');
  const { status, body, headers, alpn } = await new Promise<{ status: number; body: string; headers: Record<string, unknown>; alpn: string | undefined }>((resolve, reject) => {
    const req = session.request({ ':path': '/hello', ':authority': 'web.localhost', cookie: 'a=1' });
    req.end();
    let text = '';
    let h: Record<string, unknown> = {};
    req.setEncoding('utf8');
    req.on('response', (x) => { h = x; });
    req.on('data', (c: string) => { text += c; });
    req.on('end', () => resolve({ status: Number(h[':status']), body: text, headers: h, alpn: session.alpnProtocol }));
    req.on('error', reject);
  });
  assert.equal(alpn, 'h2');
  assert.equal(status, 200, body);
  const seen = JSON.parse(body) as { host: string; proto: string; port: string; size: number; cookie: string };
  assert.deepEqual([seen.host, seen.proto, seen.port, seen.size, seen.cookie], ['web.localhost', 'https', String(env.port), 0, 'a=1']);
  assert.match(String(headers['fly-request-id']), /-test-region$/);
  assert.equal(headers['connection'], undefined, 'no connection-specific header reaches an h2 client');

  // An unknown app over h2 gets the proxy's own error answer.
  const missing = await new Promise<{ status: number; code: unknown }>((resolve, reject) => {
    const req = session.request({ ':path': '/', ':authority': 'ghost.localhost' });
    req.end();
    req.on('response', (h) => { resolve({ status: Number(h[':status']), code: h['tarmac-proxy-error'] }); req.close(); });
    req.on('error', reject);
  });
  assert.deepEqual(missing, { status: 404, code: 'app_not_found' });
});

test('a large body streams both ways through h2: the machine answers before the upload ends', async (t) => {
  const env = await setup(t);
  const session = h2session(t, env.port, 'web.localhost');
  const req = session.request({ ':method': 'POST', ':path': '/echo', ':authority': 'web.localhost' });
  const chunk = Buffer.alloc(256 * 1024, 7);
  const total = 64 * 1024 * 1024;
  const sent = createHash('sha256');
  const got = createHash('sha256');
  let received = 0;
  let status = 0;
  const firstEcho = new Promise<void>((resolve) => req.once('data', () => resolve()));
  const done = new Promise<void>((resolve, reject) => {
    req.on('response', (h) => { status = Number(h[':status']); });
    req.on('data', (c: Buffer) => { received += c.length; got.update(c); });
    req.on('end', () => resolve());
    req.on('error', reject);
  });
  const write = async (n: number) => {
    for (let i = 0; i < n; i++) {
      sent.update(chunk);
      if (!req.write(chunk)) await new Promise((r) => req.once('drain', r));
    }
  };
  await write(4);
  // Nothing more is sent until the machine's echo arrives: a proxy buffering whole bodies would never get here.
  await firstEcho;
  await write(total / chunk.length - 4);
  req.end();
  await done;
  assert.equal(status, 200);
  assert.equal(received, total);
  assert.equal(got.digest('hex'), sent.digest('hex'));
});

test('a custom certificate chain with an intermediate is served whole', async (t) => {
  const env = await setup(t);
  await addCert(env, 'web', 'chain.example.com');
  const s = await new Promise<import('node:tls').TLSSocket>((resolve, reject) => {
    const sock = tlsConnect({ host: '127.0.0.1', port: env.port, servername: 'chain.example.com', ca: env.ca.cert }, () => resolve(sock));
    sock.on('error', reject);
  });
  t.after(() => s.destroy());
  const leaf = s.getPeerX509Certificate();
  assert.ok(leaf !== undefined && leaf.checkHost('chain.example.com'));
  assert.ok(leaf.checkIssued(new X509Certificate(env.ca.cert)));
  assert.ok(s.authorized);
});

test('a proxy cluster terminates TLS in every worker and follows certificate changes', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'web');
  const backend = await echoBackend(t);
  await startedMachine(catalog, 'web', httpService((backend.address() as AddressInfo).port));
  const ca = await testCa();
  const env = { catalog, ca };
  const before = await addCert(env, 'web', 'www.example.com');
  const proxy = await startProxyCluster({
    catalog, http: { host: '127.0.0.1', port: 0 }, https: { host: '127.0.0.1', port: 0 }, appsDomain: 'localhost', log: silentLogger(), workers: 2, logLevel: 'silent',
  });
  t.after(() => proxy.close());
  const port = proxy.httpsAddress!.port;
  // Each handshake is a new connection, which the primary hands to the workers in turn.
  for (let i = 0; i < 4; i++) assert.equal((await handshake(port, { servername: 'www.example.com' })).cert.fingerprint256, before);
  const after = await addCert(env, 'web', 'www.example.com');
  await waitFor('every worker serves the renewed certificate', async () => {
    const seen = await Promise.all([0, 1, 2, 3].map(() => handshake(port, { servername: 'www.example.com' })));
    return seen.every((s) => s.cert.fingerprint256 === after);
  });
  const res = await get11(port, 'www.example.com', ca.cert);
  assert.equal(res.status, 200);
  assert.equal((JSON.parse(res.body) as { proto: string }).proto, 'https');
});
