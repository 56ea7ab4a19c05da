// ACME end to end against a real pebble: a host requests, proves (HTTP-01 or TLS-ALPN-01 on its own proxy), stores and serves the certificate.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { connect as tlsConnect } from 'node:tls';
import type { CertificateResponse } from '../src/client/index.ts';
import { startTestHost, type TestHost } from './helpers/host.ts';
import { startPebble, type Pebble } from './helpers/pebble.ts';
import { freePort } from './helpers/registry.ts';
import { waitFor } from './helpers/wait.ts';

interface Env {
  host: TestHost;
  pebble: Pebble;
  tlsPort: number;
  /** Challenge types published in certificate rows so far (what the proxies were asked to answer). */
  published: string[];
}

async function setup(t: TestContext, name: string, challenge: 'http-01' | 'tls-alpn-01'): Promise<Env> {
  const [httpPort, tlsPort] = [await freePort(), await freePort()];
  const pebble = await startPebble({ httpPort, tlsPort, names: { [name]: '127.0.0.1' } });
  t.after(() => pebble.close());
  const host = await startTestHost({
    config: {
      roles: ['edge', 'api'],
      proxy: { http: { host: '127.0.0.1', port: httpPort }, https: { host: '127.0.0.1', port: tlsPort } },
      acme: { enabled: true, directory: pebble.directoryUrl, ca_file: pebble.caFile, challenges: [challenge], email: 'ops@example.com' },
    },
  });
  t.after(() => host.close());
  await host.client.createApp({ app_name: 'web', org_slug: 'personal' });
  const published: string[] = [];
  t.after(host.host.catalog.subscribe((b) => {
    for (const c of b.changes) if (c.kind === 'certificate') published.push(...(c.value?.acme?.challenges ?? []).map((x) => x.type));
  }));
  return { host, pebble, tlsPort, published };
}

/** Polls the API until the order is no longer pending; fails with the row's error if it failed. */
async function issued(host: TestHost, name: string): Promise<CertificateResponse> {
  const cert = await waitFor(`the certificate of ${name} to leave pending`, async () => {
    const c = await host.client.getCertificate('web', name);
    return c.status === 'pending' ? undefined : c;
  }, 60_000);
  assert.equal(cert.status, 'issued', `the order failed: ${cert.error ?? ''}`);
  return cert;
}

/** The certificate the proxy serves for `name`, verified against `root` (rejects when it does not verify). */
function servedCertificate(port: number, name: string, root: string): Promise<X509Certificate> {
  return new Promise((resolve, reject) => {
    const s = tlsConnect({ host: '127.0.0.1', port, servername: name, ca: root, ALPNProtocols: ['http/1.1'] }, () => {
      const der = s.getPeerCertificate().raw;
      s.end();
      resolve(new X509Certificate(der));
    });
    s.on('error', reject);
  });
}

async function assertServed(pebble: Pebble, tlsPort: number, name: string, cert: CertificateResponse): Promise<void> {
  const root = await pebble.issuingRoot();
  const served = await servedCertificate(tlsPort, name, root);
  assert.equal(served.fingerprint256, cert.fingerprint_sha256, 'SNI serves the issued certificate, and it verifies against pebble\'s root');
  assert.ok(served.checkHost(name));
}

test('HTTP-01: a requested certificate is proved on the proxy\'s HTTP listener, stored, and then served by SNI', async (t) => {
  const name = 'www.acme.test';
  const { host, pebble, tlsPort, published } = await setup(t, name, 'http-01');
  const requested = await host.client.requestAcmeCertificate('web', name);
  assert.equal(requested.status, 'pending');
  assert.equal(requested.acme_requested, true);
  const cert = await issued(host, name);
  assert.equal(cert.source, 'acme');
  assert.match(cert.issuer, /Pebble/);
  assert.ok(Date.parse(cert.not_after) > Date.now());
  assert.deepEqual(published, ['http-01'], 'the order published one HTTP-01 challenge for the proxies');
  const row = host.host.catalog.getCertificate(name);
  assert.deepEqual(row?.acme?.challenges, [], 'challenges leave the row once issued');
  assert.ok(row?.private_key.includes('PRIVATE KEY'));
  assert.ok(!JSON.stringify(cert).includes('PRIVATE KEY'), 'the API never returns the key');
  await assertServed(pebble, tlsPort, name, cert);
});

test('TLS-ALPN-01: a requested certificate is proved on the proxy\'s TLS listener (acme-tls/1), stored, and served by SNI', async (t) => {
  const name = 'alpn.acme.test';
  const { host, pebble, tlsPort, published } = await setup(t, name, 'tls-alpn-01');
  await host.client.requestAcmeCertificate('web', name);
  const cert = await issued(host, name);
  assert.equal(cert.source, 'acme');
  assert.deepEqual(published, ['tls-alpn-01']);
  await assertServed(pebble, tlsPort, name, cert);

  // Asking again renews in place: the old certificate serves until the new one replaces it.
  const again = await host.client.requestAcmeCertificate('web', name);
  assert.equal(again.status, 'pending');
  assert.equal(again.fingerprint_sha256, cert.fingerprint_sha256, 'the pending row keeps the certificate it had');
  const renewed = await issued(host, name);
  assert.notEqual(renewed.fingerprint_sha256, cert.fingerprint_sha256);
  await assertServed(pebble, tlsPort, name, renewed);
});

test('a failed order says why, and the host name gets no certificate', async (t) => {
  const name = 'www.acme.test';
  const { host } = await setup(t, name, 'http-01');
  await host.client.requestAcmeCertificate('web', 'nowhere.acme.test'); // pebble's DNS knows no such name
  const failed = await waitFor('the order to fail', async () => {
    const c = await host.client.getCertificate('web', 'nowhere.acme.test');
    return c.status === 'failed' ? c : undefined;
  }, 60_000);
  assert.match(failed.error ?? '', /nowhere\.acme\.test/, failed.error);
  assert.equal(failed.fullchain, '');
});
