// The certificates API end to end: a real SQLite catalog, the API on port 0, the typed client, certificates made per test.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { rejects, twoOrgApi, type TwoOrgApi } from './testing.ts';
import { ApiError } from '../client/index.ts';
import { testCa, testCert } from '../../test/helpers/certs.ts';

async function setup(t: TestContext): Promise<TwoOrgApi> {
  return twoOrgApi(t);
}


test('custom certificates are added, listed, shown and removed; the private key never comes back', async (t) => {
  const { admin, catalog } = await setup(t);
  await admin.createApp({ app_name: 'web' });
  const ca = await testCa();
  const www = await testCert(['www.example.com', 'example.com'], { ca });
  const added = await admin.addCustomCertificate('web', { hostname: 'WWW.Example.com', fullchain: www.fullchain, private_key: www.key });
  assert.equal(added.hostname, 'www.example.com', 'host names are stored lowercase');
  assert.equal(added.source, 'custom');
  assert.match(added.issuer, /Tarmac Test CA/);
  assert.ok(Date.parse(added.not_after) > Date.now());
  assert.match(added.fingerprint_sha256, /^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
  assert.equal((added.fullchain.match(/BEGIN CERTIFICATE/g) ?? []).length, 2, 'the chain keeps its intermediate');
  const wild = await testCert(['*.example.org']);
  await admin.addCustomCertificate('web', { hostname: '*.example.org', fullchain: wild.fullchain, private_key: wild.key });

  const list = await admin.listCertificates('web');
  assert.equal(list.total_certificates, 2);
  assert.deepEqual(list.certificates.map((c) => c.hostname), ['*.example.org', 'www.example.com']);
  const shown = await admin.getCertificate('web', 'www.example.com');
  assert.equal(shown.fingerprint_sha256, added.fingerprint_sha256);
  for (const body of [added, list, shown]) {
    const text = JSON.stringify(body);
    assert.ok(!text.includes('PRIVATE KEY') && !text.includes('private_key'), 'no key in any answer');
  }
  assert.match(catalog.getCertificate('www.example.com')?.private_key ?? '', /BEGIN PRIVATE KEY/, 'the catalog keeps the key for the proxy');

  await admin.deleteCertificate('web', 'www.example.com');
  await rejects(admin.getCertificate('web', 'www.example.com'), 404, /no certificate for host name "www.example.com"/);
  await rejects(admin.deleteCertificate('web', 'www.example.com'), 404, /no certificate/);
  assert.deepEqual((await admin.listCertificates('web')).certificates.map((c) => c.hostname), ['*.example.org']);
});

test('invalid certificate uploads are refused with 400 naming the field', async (t) => {
  const { admin } = await setup(t);
  await admin.createApp({ app_name: 'web' });
  const good = await testCert(['api.example.com']);
  const other = await testCert(['api.example.com']);
  const expired = await testCert(['api.example.com'], { notBefore: new Date(Date.now() - 10 * 86_400_000), notAfter: new Date(Date.now() - 86_400_000) });
  const add = (body: Record<string, unknown>) => admin.addCustomCertificate('web', body as never);
  await rejects(add({ fullchain: good.fullchain, private_key: good.key }), 400, /hostname: required/);
  await rejects(add({ hostname: 'not a host', fullchain: good.fullchain, private_key: good.key }), 400, /hostname: must be a DNS name/);
  await rejects(add({ hostname: 'api.example.com', fullchain: 'hello', private_key: good.key }), 400, /fullchain: must hold at least one PEM/);
  await rejects(add({ hostname: 'api.example.com', fullchain: '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----', private_key: good.key }), 400, /fullchain: certificate 1 of the chain is not a valid X\.509/);
  await rejects(add({ hostname: 'api.example.com', fullchain: good.fullchain, private_key: 'nope' }), 400, /private_key: must be an unencrypted PEM private key/);
  await rejects(add({ hostname: 'api.example.com', fullchain: good.fullchain, private_key: other.key }), 400, /private_key: does not match the first certificate/);
  await rejects(add({ hostname: 'www.example.com', fullchain: good.fullchain, private_key: good.key }), 400, /hostname: is not covered by the certificate \(it is for DNS:api\.example\.com\)/);
  await rejects(add({ hostname: 'api.example.com', fullchain: expired.fullchain, private_key: expired.key }), 400, /fullchain: the certificate expired on/);
  await rejects(add({ hostname: 'api.example.com', fullchain: good.fullchain, private_key: good.key, extra: 1 }), 400, /extra: unknown field/);
  try {
    await add({ hostname: 'api.example.com', fullchain: good.fullchain, private_key: other.key });
  } catch (e) {
    assert.ok(e instanceof ApiError && !e.message.includes('PRIVATE KEY'), 'errors never echo the key');
  }
  assert.equal((await admin.listCertificates('web')).total_certificates, 0, 'nothing was stored');
});

test('certificates are scoped to the app\'s organization, and a host name belongs to one app', async (t) => {
  const { admin, acme } = await setup(t);
  await admin.createApp({ app_name: 'web' });
  await acme.createApp({ app_name: 'shop' });
  const c = await testCert(['shop.example.com']);
  await rejects(acme.addCustomCertificate('web', { hostname: 'shop.example.com', fullchain: c.fullchain, private_key: c.key }), 404, /app "web" not found/);
  await acme.addCustomCertificate('shop', { hostname: 'shop.example.com', fullchain: c.fullchain, private_key: c.key });
  await rejects(acme.listCertificates('web'), 404, /app "web" not found/);
  await rejects(admin.addCustomCertificate('web', { hostname: 'shop.example.com', fullchain: c.fullchain, private_key: c.key }), 409, /already has a certificate in another app/);
  await rejects(admin.getCertificate('web', 'shop.example.com'), 404, /no certificate/);
  assert.equal((await admin.getCertificate('shop', 'shop.example.com')).app, 'shop', 'the admin sees every org');
});

test('no app claims a name of the apps domain but its own: not another app\'s, not the domain, not a wildcard over it', async (t) => {
  const { admin, acme } = await twoOrgApi(t, { appsDomain: 'apps.example.net' });
  await admin.createApp({ app_name: 'web' });
  await acme.createApp({ app_name: 'shop' });
  for (const name of ['web.apps.example.net', 'apps.example.net', '*.apps.example.net', 'x.web.apps.example.net']) {
    const c = await testCert([name]);
    await rejects(acme.addCustomCertificate('shop', { hostname: name, fullchain: c.fullchain, private_key: c.key }), 400,
      new RegExp(`hostname: "${name.replace(/[.*]/g, '\\$&')}" is in the apps domain "apps\\.example\\.net".*app "shop" may only use "shop\\.apps\\.example\\.net"`));
  }
  await rejects(acme.requestAcmeCertificate('shop', 'web.apps.example.net'), 400, /hostname: "web\.apps\.example\.net" is in the apps domain/);
  assert.equal((await acme.listCertificates('shop')).total_certificates, 0, 'nothing was written');
  // Its own name, and names outside the domain (a wildcard one level above covers no app's name), are the app's to use.
  const own = await testCert(['shop.apps.example.net']);
  await acme.addCustomCertificate('shop', { hostname: 'shop.apps.example.net', fullchain: own.fullchain, private_key: own.key });
  const above = await testCert(['*.example.net']);
  await acme.addCustomCertificate('shop', { hostname: '*.example.net', fullchain: above.fullchain, private_key: above.key });
  assert.deepEqual((await acme.listCertificates('shop')).certificates.map((c) => c.hostname), ['*.example.net', 'shop.apps.example.net']);
});
