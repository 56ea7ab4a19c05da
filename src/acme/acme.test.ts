// The ACME renewal decision, the API's request/join/refuse rules, and the compare-and-swap lock between two hosts' managers.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Readable, Writable } from 'node:stream';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openSqliteCatalog, type Catalog, type Certificate, type CertificateAcme } from '../catalog/index.ts';
import { startApi } from '../api/index.ts';
import { TarmacClient, ApiError } from '../client/index.ts';
import { runCli } from '../cli/main.ts';
import { silentLogger } from '../shared/log.ts';
import { AcmeManager, acmeDue, defaultAcmePolicy } from './index.ts';

const day = 86_400_000;
const now = Date.parse('2026-01-01T00:00:00Z');
const iso = (ms: number) => new Date(ms).toISOString();

/** An ACME row holding a 90-day certificate that expires at `notAfter`. */
function row(acme: Certificate['acme'], notAfter = now + 60 * day): Certificate {
  return {
    hostname: 'www.example.com', app: 'web', source: 'acme', fullchain: 'PEM', private_key: 'KEY', issuer: 'CN=CA', subject: 'CN=www',
    not_before: iso(notAfter - 90 * day), not_after: iso(notAfter), fingerprint_sha256: 'AA', created_at: iso(now - day), ...(acme ? { acme } : {}),
  };
}

test('renewal decision: an issued certificate renews within 30 days of expiry, not before', () => {
  const issued: CertificateAcme = { status: 'issued', challenges: [], updated_at: iso(now - 60 * day) };
  assert.equal(acmeDue(row(issued, now + 31 * day), now, defaultAcmePolicy), false);
  assert.equal(acmeDue(row(issued, now + 30 * day - 1), now, defaultAcmePolicy), true);
  assert.equal(acmeDue(row(issued, now - day), now, defaultAcmePolicy), true, 'an expired one too');
  assert.equal(acmeDue(row(issued, now + 10 * day), now, { ...defaultAcmePolicy, renewBeforeMs: 7 * day }), false, 'the window is configurable');
  assert.equal(acmeDue(row(undefined, now + day), now, defaultAcmePolicy), false, 'uploaded certificates are never ordered');
  const shortLived = (left: number) => ({ ...row(issued, now + left), not_before: iso(now + left - 6 * day) });
  assert.equal(acmeDue(shortLived(5 * day), now, defaultAcmePolicy), false, 'a fresh 6-day certificate is not renewed at once');
  assert.equal(acmeDue(shortLived(2 * day - 1), now, defaultAcmePolicy), true, 'a 6-day certificate renews with a third of its life left');
});

test('order decision: requests nobody took start now; running orders are left alone until stale; failures retry later', () => {
  const pending = (over: object) => row({ status: 'pending', challenges: [], updated_at: iso(now - 60_000), ...over });
  assert.equal(acmeDue(pending({}), now, defaultAcmePolicy), true, 'no host took it yet');
  assert.equal(acmeDue(pending({ host_id: 'h1' }), now, defaultAcmePolicy), false, 'h1 is on it');
  assert.equal(acmeDue(pending({ host_id: 'h1', updated_at: iso(now - 11 * 60_000) }), now, defaultAcmePolicy), true, 'h1 went quiet: take over');
  const failed = (ago: number) => row({ status: 'failed', challenges: [], error: 'dns', updated_at: iso(now - ago) });
  assert.equal(acmeDue(failed(59 * 60_000), now, defaultAcmePolicy), false);
  assert.equal(acmeDue(failed(61 * 60_000), now, defaultAcmePolicy), true);
});

async function tempCatalog(t: TestContext): Promise<{ catalog: Catalog; dir: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-acme-'));
  const catalog = openSqliteCatalog(join(dir, 'catalog.sqlite'));
  t.after(async () => { await catalog.close(); await rm(dir, { recursive: true, force: true }); });
  const at = new Date().toISOString();
  await catalog.putOrg({ slug: 'personal', name: 'Personal', network_id: 1, created_at: at });
  await catalog.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: at });
  await catalog.createApp({ name: 'api', org_slug: 'personal', network: 'default', created_at: at });
  return { catalog, dir };
}

async function status(p: Promise<unknown>): Promise<string> {
  return p.then(() => 'ok', (e: unknown) => (e instanceof ApiError ? `${e.status} ${e.message}` : String(e)));
}

test('POST certificates/acme: a request while one is pending joins it; bad names are 400s naming hostname; another app\'s name is 409', async (t) => {
  const { catalog } = await tempCatalog(t);
  const api = await startApi({ catalog, listen: { host: '127.0.0.1', port: 0 }, log: silentLogger(), region: 'local', adminToken: 'tok' });
  t.after(() => api.close());
  const client = new TarmacClient({ baseUrl: api.url, token: 'tok' });

  const first = await client.requestAcmeCertificate('web', 'WWW.Example.com.');
  assert.equal(first.hostname, 'www.example.com');
  assert.equal(first.status, 'pending');
  assert.equal(first.fullchain, '');
  const second = await client.requestAcmeCertificate('web', 'www.example.com');
  assert.deepEqual(second, first, 'the second request joins the pending one');
  assert.equal(catalog.listCertificates().length, 1);
  assert.deepEqual((await client.listCertificates('web')).certificates.map((c) => `${c.hostname} ${c.status}`), ['www.example.com pending']);

  assert.match(await status(client.requestAcmeCertificate('web', '*.example.com')), /^400 hostname: cannot be a wildcard/);
  assert.match(await status(client.requestAcmeCertificate('web', 'not a name')), /^400 hostname: /);
  assert.match(await status(client.requestAcmeCertificate('api', 'www.example.com')), /^409 /);

  let stdout = '';
  const sink = new Writable({ write(chunk: Buffer | string, _enc, cb) { stdout += String(chunk); cb(); } });
  const code = await runCli(['certs', 'request', 'api.example.com', '-a', 'web'], {
    stdout: sink, stderr: sink, stdin: Readable.from([]), env: { TARMAC_API_URL: api.url, TARMAC_API_TOKEN: 'tok' }, cwd: tmpdir(),
    interrupt: new AbortController().signal,
  });
  assert.equal(code, 0, stdout);
  assert.equal(stdout, 'Requested a certificate for api.example.com (pending): see \'tarmac certs show api.example.com -a web\'\n');
});

test('two hosts\' managers seeing the same request: the compare-and-swap lets exactly one run the order', async (t) => {
  const { catalog, dir } = await tempCatalog(t);
  await catalog.putCertificate({
    ...row({ status: 'pending', challenges: [], updated_at: new Date().toISOString() }), fullchain: '', private_key: '',
  }, { expect: undefined });
  // No ACME server there (every path is a 404): the order that runs fails at once, which is all this test needs.
  const notAcme = createServer((_req, res) => res.writeHead(404).end());
  await new Promise<void>((r) => notAcme.listen(0, '127.0.0.1', r));
  t.after(() => new Promise<void>((r) => notAcme.close(() => r())));
  const directoryUrl = `http://127.0.0.1:${(notAcme.address() as AddressInfo).port}/dir`;
  const managers = ['h1', 'h2'].map((hostId) => new AcmeManager({
    catalog, hostId, challenges: ['http-01'], policy: defaultAcmePolicy, checkIntervalMs: 3_600_000, log: silentLogger(),
    account: { directoryUrl, dir: join(dir, hostId) },
  }));
  t.after(() => Promise.all(managers.map((m) => m.close())));
  const took = await Promise.all(managers.map((m) => m.take('www.example.com')));
  assert.deepEqual(took.sort(), [false, true]);
  const owner = catalog.getCertificate('www.example.com')?.acme;
  assert.equal(owner?.status, 'pending');
  assert.ok(owner?.host_id === 'h1' || owner?.host_id === 'h2');
  await Promise.all(managers.map((m) => m.idle()));
  const after = catalog.getCertificate('www.example.com')?.acme;
  assert.equal(after?.status, 'failed');
  assert.match(after?.error ?? '', /^ACME account at http:\/\/127\.0\.0\.1:\d+\/dir could not be opened: .*404/, after?.error);
  assert.equal(after?.host_id, undefined, 'a failed row is free for any host to retry');
});
