// Tests of the image store against a real docker-registry, with a counting (and tampering) proxy in front.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, request as httpRequest, type Server } from 'node:http';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import { ImageStore, type ImageProgress } from './index.ts';
import { TarmacError } from '../../shared/errors.ts';
import { silentLogger } from '../../shared/log.ts';
import { startRegistry, freePort, type TestRegistry } from '../../../test/helpers/registry.ts';
import { buildAndPushImage, httpImage, httpImageCommand } from '../../../test/helpers/images.ts';

interface CountingProxy {
  host: string;
  /** "METHOD /v2/..." of every request seen. */
  requests: string[];
  /** Blob digests whose bodies the proxy corrupts (one byte flipped, same length). */
  corrupt: Set<string>;
  close(): Promise<void>;
}

/**
 * An HTTP proxy to the registry that records requests and can corrupt chosen blobs. With `auth` it plays a
 * registry with token auth, as Docker Hub does: 401 + a Bearer challenge, tokens from its own /token realm,
 * which wants basic credentials when `auth.username` is set and gives anonymous tokens otherwise.
 */
async function startProxy(target: string, auth?: { username?: string; password?: string }): Promise<CountingProxy> {
  const [targetHost, targetPort] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  const requests: string[] = [];
  const corrupt = new Set<string>();
  const token = 'test-token-0123';
  const server: Server = createServer((req, res) => {
    requests.push(`${req.method} ${req.url}`);
    if (auth && req.url?.startsWith('/token')) {
      const url = new URL(req.url, 'http://x');
      const basic = auth.username ? `Basic ${Buffer.from(`${auth.username}:${auth.password ?? ''}`).toString('base64')}` : undefined;
      const ok = url.searchParams.get('service') === 'test-registry' && /^repository:[a-z/]+:pull$/.test(url.searchParams.get('scope') ?? '') && (!basic || req.headers.authorization === basic);
      res.writeHead(ok ? 200 : 401, { 'content-type': 'application/json' });
      res.end(ok ? JSON.stringify({ token, expires_in: 300 }) : '{"errors":[{"code":"UNAUTHORIZED"}]}');
      return;
    }
    if (auth && req.headers.authorization !== `Bearer ${token}`) {
      const repo = /^\/v2\/(.+)\/(?:manifests|blobs)\//.exec(req.url ?? '')?.[1] ?? '';
      res.writeHead(401, { 'www-authenticate': `Bearer realm="http://${req.headers.host}/token",service="test-registry",scope="repository:${repo}:pull"` });
      res.end();
      return;
    }
    const up = httpRequest({ host: targetHost, port: targetPort, method: req.method, path: req.url, headers: { ...req.headers, host: target } }, (ur) => {
      const m = /\/blobs\/(sha256:[a-f0-9]{64})$/.exec(req.url ?? '');
      if (m?.[1] && corrupt.has(m[1]) && ur.statusCode === 200) {
        const chunks: Buffer[] = [];
        ur.on('data', (c: Buffer) => chunks.push(c));
        ur.on('end', () => {
          const body = Buffer.concat(chunks);
          const i = Math.floor(body.length / 2);
          body[i] = (body[i] ?? 0) ^ 0xff;
          res.writeHead(200, ur.headers);
          res.end(body);
        });
        return;
      }
      res.writeHead(ur.statusCode ?? 502, ur.headers);
      ur.pipe(res);
    });
    up.on('error', () => { res.writeHead(502); res.end(); });
    req.pipe(up);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    host: `127.0.0.1:${port}`,
    requests,
    corrupt,
    close: () => new Promise<void>((resolve) => { server.close(() => resolve()); server.closeAllConnections(); }),
  };
}

async function tempDir(t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-images-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

function newStore(dir: string, extra: Partial<ConstructorParameters<typeof ImageStore>[0]> = {}): ImageStore {
  return new ImageStore({ dir, log: silentLogger(), ...extra });
}

async function rejectsWith(p: Promise<unknown>, code: string, message: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof TarmacError, `expected TarmacError, got ${String(e)}`);
    assert.equal(e.code, code);
    assert.match(e.message, message);
    return true;
  });
}

const blobRequests = (p: CountingProxy): string[] => p.requests.filter((r) => r.includes('/blobs/'));

describe('ImageStore.parseReference', () => {
  const cases: Array<[string, { registry: string; repository: string; tag: string; digest?: string }]> = [
    ['nginx', { registry: 'registry-1.docker.io', repository: 'library/nginx', tag: 'latest' }],
    ['nginx:1.25', { registry: 'registry-1.docker.io', repository: 'library/nginx', tag: '1.25' }],
    ['docker.io/nginx', { registry: 'registry-1.docker.io', repository: 'library/nginx', tag: 'latest' }],
    ['index.docker.io/library/nginx:alpine', { registry: 'registry-1.docker.io', repository: 'library/nginx', tag: 'alpine' }],
    ['flyio/hellofly:latest', { registry: 'registry-1.docker.io', repository: 'flyio/hellofly', tag: 'latest' }],
    ['127.0.0.1:5000/app:v1', { registry: '127.0.0.1:5000', repository: 'app', tag: 'v1' }],
    ['localhost/app', { registry: 'localhost', repository: 'app', tag: 'latest' }],
    ['localhost:5000/team/app', { registry: 'localhost:5000', repository: 'team/app', tag: 'latest' }],
    ['[::1]:5000/app:v2', { registry: '[::1]:5000', repository: 'app', tag: 'v2' }],
    ['ghcr.io/owner/some_app-x.y:1.0-rc.1', { registry: 'ghcr.io', repository: 'owner/some_app-x.y', tag: '1.0-rc.1' }],
    [`reg.example.com/app@sha256:${'a'.repeat(64)}`, { registry: 'reg.example.com', repository: 'app', tag: '', digest: `sha256:${'a'.repeat(64)}` }],
    [`reg.example.com:443/app:v1@sha256:${'b'.repeat(64)}`, { registry: 'reg.example.com:443', repository: 'app', tag: 'v1', digest: `sha256:${'b'.repeat(64)}` }],
    [`busybox@sha256:${'c'.repeat(64)}`, { registry: 'registry-1.docker.io', repository: 'library/busybox', tag: '', digest: `sha256:${'c'.repeat(64)}` }],
  ];
  for (const [ref, want] of cases) {
    test(`parses ${ref}`, () => assert.deepEqual(ImageStore.parseReference(ref), want));
  }
  const bad = ['', ' nginx', 'Nginx', 'nginx:', 'nginx:-bad', 'app@sha256:abc', `app@sha512:${'a'.repeat(128)}`, 'reg.io/', 'reg.io//app', 'app/', ':tag', 'a/b:c:d', `nginx:${'x'.repeat(129)}`, 'bad_host!:5000/app'];
  for (const ref of bad) {
    test(`rejects ${JSON.stringify(ref)}`, () => {
      assert.throws(() => ImageStore.parseReference(ref), (e: unknown) => e instanceof TarmacError && e.code === 'invalid_argument');
    });
  }
});

describe('ImageStore.pull against docker-registry', () => {
  let registry: TestRegistry;
  let httpRef: string;
  let multiRef: string;

  before(async () => {
    registry = await startRegistry();
    [httpRef, multiRef] = await Promise.all([
      httpImage(registry.host),
      buildAndPushImage(registry.host, 'multi', {
        files: { 'etc/gone': 'remove me', 'etc/keep': 'keep me', 'opt/dir/a': 'a' },
        extraLayers: [
          { files: { 'etc/added': 'new' }, remove: ['etc/gone'] },
          { remove: ['/opt/dir'] },
        ],
        entrypoint: ['/bin/sh'],
        cmd: ['-c', 'echo hi'],
        env: ['PATH=/bin', 'GREETING=hi'],
        labels: { 'com.example.team': 'infra' },
        format: 'v2s2',
      }),
    ]);
  });
  after(() => registry?.stop());

  test('pulls a single-layer OCI image: busybox in the rootfs, Cmd from the config', async (t) => {
    const dir = await tempDir(t);
    const store = newStore(dir);
    t.after(() => store.close());
    const phases = new Set<string>();
    const img = await store.pull(httpRef, { onProgress: (p) => phases.add(p.phase) });
    assert.ok(existsSync(join(img.rootfs, 'bin/busybox')));
    assert.ok(existsSync(join(img.rootfs, 'var/www/cgi-bin/whoami')));
    assert.ok(img.rootfs.startsWith(join(dir, 'rootfs') + '/'));
    assert.deepEqual(img.config.Cmd, ['sh', '-c', httpImageCommand]);
    assert.deepEqual(img.config.Env, ['PATH=/bin']);
    assert.equal(img.ref.registry, registry.host);
    assert.equal(img.ref.repository, 'http');
    assert.equal(img.ref.tag, 'latest');
    assert.match(img.ref.digest, /^sha256:[a-f0-9]{64}$/);
    assert.deepEqual([...phases].sort(), ['done', 'downloading', 'resolving', 'unpacking']);
    // The store is an OCI layout with blobs by digest and no temp leftovers.
    assert.ok(existsSync(join(dir, 'oci-layout')));
    assert.ok(existsSync(join(dir, 'blobs/sha256', img.ref.digest.slice(7))));
    assert.deepEqual(readdirSync(join(dir, 'tmp')), []);
    const index = JSON.parse(readFileSync(join(dir, 'index.json'), 'utf8')) as { manifests: unknown[] };
    assert.equal(index.manifests.length, 1);
  });

  test('unpacks a multi-layer Docker v2s2 image with whiteouts applied', async (t) => {
    const store = newStore(await tempDir(t));
    t.after(() => store.close());
    const img = await store.pull(multiRef);
    assert.ok(!existsSync(join(img.rootfs, 'etc/gone')), 'whited-out file is gone');
    assert.ok(!existsSync(join(img.rootfs, 'opt/dir')), 'whited-out directory is gone');
    assert.equal(readFileSync(join(img.rootfs, 'etc/keep'), 'utf8'), 'keep me');
    assert.equal(readFileSync(join(img.rootfs, 'etc/added'), 'utf8'), 'new');
    assert.deepEqual(readdirSync(join(img.rootfs, 'etc')).filter((n) => n.startsWith('.wh.')), []);
    assert.deepEqual(img.config.Entrypoint, ['/bin/sh']);
    assert.deepEqual(img.config.Cmd, ['-c', 'echo hi']);
    assert.deepEqual(img.config.Env, ['PATH=/bin', 'GREETING=hi']);
    assert.deepEqual(img.ref.labels, { 'com.example.team': 'infra' });
  });

  test('a second pull downloads no blobs, even from a new store on the same dir, and works offline', async (t) => {
    const proxy = await startProxy(registry.host);
    t.after(() => proxy.close());
    const dir = await tempDir(t);
    const ref = `${proxy.host}/http:latest`;
    const first = newStore(dir);
    t.after(() => first.close());
    const a = await first.pull(ref);
    assert.ok(blobRequests(proxy).length >= 2, 'the first pull downloads config and layer');

    proxy.requests.length = 0;
    const progress: ImageProgress[] = [];
    const b = await first.pull(ref, { onProgress: (p) => progress.push(p) });
    assert.equal(b.rootfs, a.rootfs);
    assert.deepEqual(b.ref, a.ref);
    assert.deepEqual(blobRequests(proxy), []);
    assert.deepEqual(proxy.requests, ['HEAD /v2/http/manifests/latest']);
    assert.ok(!progress.some((p) => p.phase === 'downloading'));

    proxy.requests.length = 0;
    const second = newStore(dir);
    t.after(() => second.close());
    const c = await second.pull(ref);
    assert.equal(c.rootfs, a.rootfs);
    assert.deepEqual(blobRequests(proxy), []);

    // By digest: nothing to ask the registry at all.
    proxy.requests.length = 0;
    const d = await second.pull(`${proxy.host}/http@${a.ref.digest}`);
    assert.equal(d.rootfs, a.rootfs);
    assert.equal(d.ref.tag, '');
    assert.deepEqual(proxy.requests, []);

    // Registry gone: the tag's last known digest is used.
    await proxy.close();
    const third = newStore(dir);
    t.after(() => third.close());
    const e = await third.pull(ref);
    assert.equal(e.rootfs, a.rootfs);
    assert.equal(e.ref.digest, a.ref.digest);
  });

  test('concurrent pulls of one image share one download and one unpack', async (t) => {
    const proxy = await startProxy(registry.host);
    t.after(() => proxy.close());
    const store = newStore(await tempDir(t));
    t.after(() => store.close());
    const ref = `${proxy.host}/multi:latest`;
    const unpacking: number[] = [];
    const pulls = [0, 1, 2].map((i) => store.pull(ref, { onProgress: (p) => { if (p.phase === 'unpacking') unpacking.push(i); } }));
    const images = await Promise.all(pulls);
    assert.equal(new Set(images.map((i) => i.rootfs)).size, 1);
    const blobs = blobRequests(proxy);
    assert.equal(blobs.length, new Set(blobs).size, `each blob fetched once: ${blobs.join(', ')}`);
    assert.equal(blobs.length, 5, 'config and four layers (base, added files, two whiteouts)');
    assert.deepEqual(unpacking.sort(), [0, 1, 2], 'every caller sees the shared progress');
  });

  test('an aborted pull rejects without disturbing a concurrent pull of the same image', async (t) => {
    const store = newStore(await tempDir(t));
    t.after(() => store.close());
    const controller = new AbortController();
    const aborted = store.pull(httpRef, { signal: controller.signal });
    const kept = store.pull(httpRef);
    controller.abort();
    await assert.rejects(aborted, (e: unknown) => (e as Error).name === 'AbortError');
    const img = await kept;
    assert.ok(existsSync(join(img.rootfs, 'bin/busybox')));
    await assert.rejects(store.pull(httpRef, { signal: AbortSignal.abort() }), (e: unknown) => (e as Error).name === 'AbortError');
  });

  test('follows an OCI index to the linux platform manifest, and says which platforms exist when none fits', async (t) => {
    const store = newStore(await tempDir(t));
    t.after(() => store.close());
    const manifestRes = await fetch(`http://${registry.host}/v2/http/manifests/latest`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } });
    const manifest = Buffer.from(await manifestRes.arrayBuffer());
    const digest = manifestRes.headers.get('docker-content-digest') ?? '';
    const arch = process.arch === 'arm64' ? 'arm64' : 'amd64';
    const putIndex = async (tag: string, platforms: Array<{ os: string; architecture: string }>): Promise<void> => {
      const res = await fetch(`http://${registry.host}/v2/http/manifests/${tag}`, {
        method: 'PUT',
        headers: { 'content-type': 'application/vnd.oci.image.index.v1+json' },
        body: JSON.stringify({
          schemaVersion: 2,
          mediaType: 'application/vnd.oci.image.index.v1+json',
          manifests: platforms.map((platform) => ({ mediaType: 'application/vnd.oci.image.manifest.v1+json', digest, size: manifest.length, platform })),
        }),
      });
      assert.equal(res.status, 201, await res.text());
    };
    await putIndex('multiarch', [{ os: 'linux', architecture: 's390x' }, { os: 'linux', architecture: arch }]);
    await putIndex('otherarch', [{ os: 'linux', architecture: 's390x' }, { os: 'windows', architecture: arch }]);

    const img = await store.pull(`${registry.host}/http:multiarch`);
    assert.ok(existsSync(join(img.rootfs, 'bin/busybox')));
    assert.notEqual(img.ref.digest, digest, 'the ref names the index digest');
    assert.ok(img.rootfs.includes(digest.slice(7)), 'the rootfs is keyed by the platform manifest');
    await rejectsWith(store.pull(`${registry.host}/http:otherarch`), 'image_pull_failed', new RegExp(`no linux/${arch} variant.*linux/s390x, windows/${arch}`));
  });

  test('unknown tags, repositories and unreachable registries give image_pull_failed', async (t) => {
    const store = newStore(await tempDir(t));
    t.after(() => store.close());
    await rejectsWith(store.pull(`${registry.host}/http:nope`), 'image_pull_failed', /image ".*\/http:nope" not found in registry/);
    await rejectsWith(store.pull(`${registry.host}/no/such/repo`), 'image_pull_failed', /not found in registry/);
    await rejectsWith(store.pull(`${registry.host}/http@sha256:${'0'.repeat(64)}`), 'image_pull_failed', /not found in registry/);
    const port = await freePort();
    await rejectsWith(store.pull(`127.0.0.1:${port}/http:latest`), 'image_pull_failed', /could not reach registry 127\.0\.0\.1:\d+ at http:\/\/127\.0\.0\.1:\d+ \(ECONNREFUSED\)/);
    await rejectsWith(store.pull('Not A Ref'), 'invalid_argument', /not valid/);
  });

  test('answers bearer challenges with anonymous tokens or with basic credentials', async (t) => {
    const anonymous = await startProxy(registry.host, {});
    t.after(() => anonymous.close());
    const store = newStore(await tempDir(t));
    t.after(() => store.close());
    const img = await store.pull(`${anonymous.host}/http:latest`);
    assert.ok(existsSync(join(img.rootfs, 'bin/busybox')));
    assert.equal(anonymous.requests.filter((r) => r.startsWith('GET /token')).length, 1, 'one token serves the whole pull');

    const guarded = await startProxy(registry.host, { username: 'alice', password: 's3cret' });
    t.after(() => guarded.close());
    const without = newStore(await tempDir(t));
    t.after(() => without.close());
    await rejectsWith(without.pull(`${guarded.host}/http:latest`), 'image_pull_failed', /token service of registry .* refused a pull token for http \(HTTP 401\)/);
    const withCreds = newStore(await tempDir(t), { credentials: (r) => (r === guarded.host ? { username: 'alice', password: 's3cret' } : undefined) });
    t.after(() => withCreds.close());
    const img2 = await withCreds.pull(`${guarded.host}/multi:latest`);
    assert.ok(existsSync(join(img2.rootfs, 'etc/keep')));
  });

  test('a corrupted blob is rejected and never lands in the store', async (t) => {
    const proxy = await startProxy(registry.host);
    t.after(() => proxy.close());
    const dir = await tempDir(t);
    const store = newStore(dir);
    t.after(() => store.close());
    const manifest = (await (await fetch(`http://${registry.host}/v2/http/manifests/latest`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } })).json()) as { layers: Array<{ digest: string }> };
    const layer = manifest.layers[0]?.digest ?? '';
    proxy.corrupt.add(layer);
    await rejectsWith(store.pull(`${proxy.host}/http:latest`), 'image_pull_failed', /does not match its digest/);
    assert.ok(!existsSync(join(dir, 'blobs/sha256', layer.slice(7))));
    assert.deepEqual(readdirSync(join(dir, 'rootfs')), []);
    assert.deepEqual(readdirSync(join(dir, 'tmp')), []);
    // Once the registry serves the right bytes, the same store pulls fine.
    proxy.corrupt.clear();
    const img = await store.pull(`${proxy.host}/http:latest`);
    assert.ok(existsSync(join(img.rootfs, 'bin/busybox')));
  });
});
