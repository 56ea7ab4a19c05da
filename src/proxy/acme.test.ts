// The proxy answers ACME challenges from certificate rows: HTTP-01 bodies, TLS-ALPN-01 certificates only to acme-tls/1 clients.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, X509Certificate } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { certificateFromPem, isCertificateProblem, type Catalog, type Certificate } from '../catalog/index.ts';
import { testCert } from '../../test/helpers/certs.ts';
import { waitFor } from '../../test/helpers/wait.ts';
import type { RunningProxy } from './proxy.ts';
import { createApp, proxyFor, tempCatalog } from './testing.ts';

const name = 'www.example.com';
const http01 = { type: 'http-01', token: 'tok-http', key_authorization: 'tok-http.thumbprint' } as const;
const alpn01 = { type: 'tls-alpn-01', token: 'tok-alpn', key_authorization: 'tok-alpn.thumbprint' } as const;

/** A proxy over a catalog where `www.example.com` holds an uploaded certificate and has an ACME renewal pending. */
async function setup(t: TestContext): Promise<{ catalog: Catalog; proxy: RunningProxy; held: Certificate }> {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'web');
  const pem = await testCert([name]);
  const cert = certificateFromPem({ hostname: name, app: 'web', source: 'custom', fullchain: pem.fullchain, private_key: pem.key });
  assert.ok(!isCertificateProblem(cert));
  const held: Certificate = { ...cert, acme: { status: 'pending', host_id: 'h1', challenges: [http01, alpn01], updated_at: new Date().toISOString() } };
  await catalog.putCertificate(held);
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-acme-proxy-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const proxy = await proxyFor(t, catalog, {}, {}, { https: { host: '127.0.0.1', port: 0 }, certificatesDir: dir });
  return { catalog, proxy, held };
}

function get(port: number, host: string, path: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    request({ host: '127.0.0.1', port, path, headers: { host } }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => { body += c; });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    }).on('error', reject).end();
  });
}

/** Handshakes with `alpn`; the certificate served and the protocol picked. */
function handshake(port: number, alpn: string[]): Promise<{ cert: X509Certificate; protocol: string | false | null }> {
  return new Promise((resolve, reject) => {
    const s = tlsConnect({ host: '127.0.0.1', port, servername: name, ALPNProtocols: alpn, rejectUnauthorized: false }, () => {
      resolve({ cert: new X509Certificate(s.getPeerCertificate().raw), protocol: s.alpnProtocol });
      s.destroy();
    });
    s.on('error', reject);
  });
}

test('HTTP-01: GET /.well-known/acme-challenge/<token> answers the key authorization for that host name only', async (t) => {
  const { catalog, proxy, held } = await setup(t);
  const port = proxy.address.port;
  assert.deepEqual(await get(port, `${name}:80`, `/.well-known/acme-challenge/${http01.token}`), { status: 200, body: http01.key_authorization });
  assert.notEqual((await get(port, name, '/.well-known/acme-challenge/other')).body, http01.key_authorization, 'an unknown token goes to the app');
  assert.notEqual((await get(port, 'other.example.com', `/.well-known/acme-challenge/${http01.token}`)).status, 200);
  await catalog.putCertificate({ ...held, acme: { status: 'issued', challenges: [], updated_at: new Date().toISOString() } });
  await waitFor('the challenge to be withdrawn', async () => (await get(port, name, `/.well-known/acme-challenge/${http01.token}`)).status !== 200);
});

test('TLS-ALPN-01: an acme-tls/1 client gets the acmeIdentifier certificate, every other client the host name\'s own', async (t) => {
  const { catalog, proxy, held } = await setup(t);
  const port = proxy.httpsAddress!.port;
  const challenge = await handshake(port, ['acme-tls/1']);
  assert.equal(challenge.protocol, 'acme-tls/1');
  assert.equal(challenge.cert.subjectAltName, `DNS:${name}`);
  // The extension's value is a DER OCTET STRING of the key authorization's SHA-256; Node prints unknown extensions' raw
  // bytes nowhere, so find them in the certificate's DER.
  const digest = createHash('sha256').update(alpn01.key_authorization).digest();
  assert.ok(challenge.cert.raw.includes(Buffer.concat([Buffer.from([0x04, 0x20]), digest])), 'acmeIdentifier holds SHA-256(key authorization)');

  for (const alpn of [['h2', 'http/1.1'], ['http/1.1'], ['h2', 'acme-tls/1']]) {
    const normal = await handshake(port, alpn);
    assert.equal(normal.cert.fingerprint256, new X509Certificate(held.fullchain).fingerprint256, `ALPN ${alpn.join(',')} gets the held certificate`);
  }
  await catalog.putCertificate({ ...held, acme: { status: 'issued', challenges: [], updated_at: new Date().toISOString() } });
  await waitFor('acme-tls/1 to be refused once nothing is pending', () => handshake(port, ['acme-tls/1']).then(() => false, () => true));
});
