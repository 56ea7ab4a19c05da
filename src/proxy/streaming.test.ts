// A 1 GB request body and a 1 GB response body stream through the proxy (HTTP/1.1) while the proxy's memory stays flat:
// this process's on the Node engine, and on the HAProxy engine HAProxy's processes' as well.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createCipheriv, createHash, type Hash } from 'node:crypto';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { createServer, request, type IncomingMessage, type RequestListener } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { RunningProxy } from './proxy.ts';
import { createApp, haproxyStateDir, httpService, proxyEngines, proxyOn, startedMachine, tempCatalog, type ProxyEngine } from './testing.ts';

const size = 2 ** 30;
const chunk = 2 ** 16;
/** Far below the 1 GB that passes: what buffering even a fraction of the body would exceed. */
const memoryBound = 200 * 2 ** 20;
const zeros = Buffer.alloc(chunk);

/** `bytes` of pseudo-random data from `seed` (an AES-128-CTR keystream), made chunk by chunk as it is read and hashed as it goes. */
function seeded(seed: number, bytes: number): { stream: Readable; hash: Hash } {
  const key = Buffer.alloc(16);
  key.writeUInt32BE(seed);
  const cipher = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  const hash = createHash('sha256');
  let left = bytes;
  const stream = new Readable({
    highWaterMark: chunk,
    read() {
      if (left === 0) return void this.push(null);
      const data = cipher.update(left >= chunk ? zeros : zeros.subarray(0, left));
      left -= data.length;
      hash.update(data);
      this.push(data);
    },
  });
  return { stream, hash };
}

/** A sink that counts and hashes what it is given, holding none of it. */
function counter(): { sink: Writable; bytes(): number; digest(): string } {
  const hash = createHash('sha256');
  let n = 0;
  const sink = new Writable({
    write(data: Buffer, _enc, done) {
      n += data.length;
      hash.update(data);
      done();
    },
  });
  return { sink, bytes: () => n, digest: () => hash.digest('hex') };
}

interface Memory { rssGrowth: number; arrayBuffersGrowth: number; haproxyRssGrowth: number; samples: number }

/**
 * Samples this process's RSS and ArrayBuffer memory, and the summed RSS of the `haproxy` processes, every 50 ms until
 * stopped; reports the growth over the first sample.
 */
function memoryWatch(haproxy: readonly number[]): { stop(): Memory } {
  const base = process.memoryUsage();
  const baseHaproxy = rssOf(haproxy);
  let rss = base.rss;
  let arrayBuffers = base.arrayBuffers;
  let haproxyRss = baseHaproxy;
  let samples = 0;
  const timer = setInterval(() => {
    const m = process.memoryUsage();
    rss = Math.max(rss, m.rss);
    arrayBuffers = Math.max(arrayBuffers, m.arrayBuffers);
    haproxyRss = Math.max(haproxyRss, rssOf(haproxy));
    samples++;
  }, 50);
  return {
    stop() {
      clearInterval(timer);
      return { rssGrowth: rss - base.rss, arrayBuffersGrowth: arrayBuffers - base.arrayBuffers, haproxyRssGrowth: haproxyRss - baseHaproxy, samples };
    },
  };
}

/** The summed resident memory of `pids` in bytes (VmRSS from /proc; a process gone meanwhile counts 0). */
function rssOf(pids: readonly number[]): number {
  let total = 0;
  for (const pid of pids) {
    try {
      total += Number(/^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0) * 1024;
    } catch {
      // exited
    }
  }
  return total;
}

/** The haproxy processes (master and workers) of the data plane of `proxy`, found by the config it runs. */
function haproxyPids(proxy: RunningProxy): number[] {
  const config = join(haproxyStateDir(proxy), 'haproxy.cfg');
  return execFileSync('pgrep', ['-f', config], { encoding: 'utf8' }).trim().split('\n').map(Number);
}

/** The fake machine on loopback, behind a proxy routing `stream.localhost` to it; the port and the HAProxy pids, if any. */
async function throughProxy(engine: ProxyEngine, t: TestContext, handler: RequestListener): Promise<{ port: number; haproxy: number[] }> {
  const machine = createServer(handler);
  await new Promise<void>((resolve) => machine.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => { machine.closeAllConnections(); machine.close(() => resolve()); }));
  const c = await tempCatalog(t);
  await createApp(c, 'stream');
  await startedMachine(c, 'stream', httpService((machine.address() as AddressInfo).port));
  const proxy = await proxyOn(engine, t, c);
  return { port: proxy.address.port, haproxy: engine === 'haproxy' ? haproxyPids(proxy) : [] };
}

function assertFlat(t: TestContext, m: Memory, ms: number): void {
  const mb = (x: number) => (x / 2 ** 20).toFixed(0);
  t.diagnostic(`1 GiB in ${(ms / 1000).toFixed(1)} s; RSS grew ${mb(m.rssGrowth)} MiB, ArrayBuffers ${mb(m.arrayBuffersGrowth)} MiB, HAProxy RSS ${mb(m.haproxyRssGrowth)} MiB (${m.samples} samples)`);
  assert.ok(m.samples > 0, 'memory was sampled during the transfer');
  assert.ok(m.rssGrowth < memoryBound, `RSS grew ${mb(m.rssGrowth)} MiB while 1 GiB passed (bound ${mb(memoryBound)} MiB)`);
  assert.ok(m.arrayBuffersGrowth < memoryBound, `ArrayBuffers grew ${mb(m.arrayBuffersGrowth)} MiB while 1 GiB passed (bound ${mb(memoryBound)} MiB)`);
  assert.ok(m.haproxyRssGrowth < memoryBound, `HAProxy's RSS grew ${mb(m.haproxyRssGrowth)} MiB while 1 GiB passed (bound ${mb(memoryBound)} MiB)`);
}

for (const engine of proxyEngines) {
test(`${engine}: a 1 GB upload streams through to the machine intact, with flat memory`, async (t) => {
  let received: { bytes: number; sha256: string } | undefined;
  const { port, haproxy } = await throughProxy(engine, t, (req, res) => {
    const got = counter();
    pipeline(req, got.sink).then(() => {
      received = { bytes: got.bytes(), sha256: got.digest() };
      res.end('stored\n');
    }, () => res.destroy());
  });
  const body = seeded(1, size);
  const watch = memoryWatch(haproxy);
  const started = performance.now();
  const req = request({ port, method: 'PUT', path: '/upload', agent: false, headers: { host: 'stream.localhost', 'content-length': String(size) } });
  const responded = once(req, 'response') as Promise<[IncomingMessage]>;
  await pipeline(body.stream, req);
  const [res] = await responded;
  let answer = '';
  for await (const part of res) answer += String(part);
  const memory = watch.stop();
  assert.equal(res.statusCode, 200);
  assert.equal(answer, 'stored\n');
  assert.deepEqual(received, { bytes: size, sha256: body.hash.digest('hex') });
  assertFlat(t, memory, performance.now() - started);
});

test(`${engine}: a 1 GB download streams through to the client intact, with flat memory`, async (t) => {
  let sent: Hash | undefined;
  const { port, haproxy } = await throughProxy(engine, t, (_req, res) => {
    const body = seeded(2, size);
    sent = body.hash;
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(size) });
    pipeline(body.stream, res).catch(() => res.destroy());
  });
  const watch = memoryWatch(haproxy);
  const started = performance.now();
  const req = request({ port, path: '/download', agent: false, headers: { host: 'stream.localhost' } });
  req.end();
  const [res] = await once(req, 'response') as [IncomingMessage];
  assert.equal(res.statusCode, 200);
  const got = counter();
  await pipeline(res, got.sink);
  const memory = watch.stop();
  assert.equal(got.bytes(), size);
  assert.ok(sent !== undefined, 'the machine served the download');
  assert.equal(got.digest(), sent.digest('hex'));
  assertFlat(t, memory, performance.now() - started);
});
}
