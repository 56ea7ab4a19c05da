// Idle keep-alive benchmark: memory per 10,000 idle HTTP/1.1 client connections held open to nginx, HAProxy and Tarmac's proxy.
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { mkdir, readFile, rm } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { freePort } from '../../test/helpers/registry.ts';
import { waitFor } from '../../test/helpers/wait.ts';
import { nginxCommon, type Peer, startHaproxy, startNginx, startNginxBackend, startNodeScript } from './processes.ts';
import { machine, median, watchLoad } from './stats.ts';

export interface IdleBenchOptions {
  dir: string;
  rounds: number;
  /** Idle connections held open. Default 10,000. */
  connections?: number;
}

interface Memory {
  /** RSS summed over the server's processes. */
  rss: number;
  /** V8 heap used plus external memory (Buffers), summed over a Node server's processes after a full GC. */
  heap: number | undefined;
}

interface Sample { before: Memory; after: Memory; openSeconds: number; closedEarly: number }

interface Target {
  readonly name: string;
  readonly node: boolean;
  start(dir: string): Promise<Peer>;
}

const host = 'bench.localhost';
/** Client sockets are spread over 127.0.0.2 … 127.0.0.(1 + sources), so no one address needs 10,000 ports. */
const sources = 50;
/** Server keep-alive timeouts (nginx, HAProxy) far above the measurement; Tarmac keeps its default 30 s. */
const keepAliveSeconds = 300;
const memReport = pathToFileURL(new URL('./mem-report.mjs', import.meta.url).pathname).href;

/** Raises this process's open-file limit (children started afterwards inherit it) to at least `n`. */
function ensureFileLimit(n: number): void {
  const soft = () => Number(/^Max open files\s+(\d+)/m.exec(readFileSync('/proc/self/limits', 'latin1'))?.[1] ?? 0);
  if (soft() < n) spawnSync('prlimit', ['--pid', String(process.pid), `--nofile=${n}:${n}`]);
  if (soft() < n) throw new Error(`the idle-connection benchmark needs ${n} open files; raise the limit (ulimit -n ${n}) and run it again`);
}

/** `root` and every process descending from it. */
function processTree(root: number): number[] {
  const parent = new Map<number, number>();
  for (const entry of readdirSync('/proc')) {
    const p = Number(entry);
    if (!Number.isInteger(p)) continue;
    try {
      const stat = readFileSync(`/proc/${p}/stat`, 'latin1');
      parent.set(p, Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]));
    } catch { /* gone */ }
  }
  const inTree = (p: number): boolean => p === root || (p > 1 && parent.has(p) && inTree(parent.get(p)!));
  return [...parent.keys()].filter(inTree);
}

function isNode(pid: number): boolean {
  try {
    return readlinkSync(`/proc/${pid}/exe`) === process.execPath;
  } catch {
    return false;
  }
}

function rssOf(pid: number): number {
  try {
    return Number(/^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'latin1'))?.[1] ?? 0) * 1024;
  } catch {
    return 0;
  }
}

/** Asks a Node peer that loaded mem-report.mjs for its memory after a full GC: heap used plus external. */
async function heapOf(pid: number): Promise<number> {
  const file = join(tmpdir(), `tarmac-bench-mem-${pid}.json`);
  await rm(file, { force: true });
  process.kill(pid, 'SIGUSR2');
  const text = await waitFor(`process ${pid}'s memory report`, () => readFile(file, 'utf8'));
  await rm(file, { force: true });
  const m = JSON.parse(text) as NodeJS.MemoryUsage;
  return m.heapUsed + m.external;
}

async function memoryOf(peer: Peer, node: boolean): Promise<Memory> {
  // A Node peer's tree also holds tsx's esbuild service: only the Node processes are the server.
  const pids = processTree(peer.pid).filter((p) => !node || isNode(p));
  // The GC first, so the RSS read after it is as settled as the heap.
  const heap = node ? (await Promise.all(pids.map(heapOf))).reduce((a, b) => a + b, 0) : undefined;
  return { rss: pids.reduce((n, p) => n + rssOf(p), 0), heap };
}

/** Opens a connection from `localAddress`, sends one request and resolves with the socket once the whole response is in. */
function openOne(port: number, localAddress: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ port, host: '127.0.0.1', localAddress });
    let buf = '';
    const fail = (e: Error) => { s.destroy(); reject(e); };
    s.setEncoding('latin1');
    s.on('error', fail);
    s.once('close', () => fail(new Error(`the connection from ${localAddress} closed before its response`)));
    s.on('data', (d: string) => {
      buf += d;
      const end = buf.indexOf('\r\n\r\n');
      if (end === -1) return;
      const head = buf.slice(0, end);
      if (!head.startsWith('HTTP/1.1 200')) return fail(new Error(`unexpected response: ${head.split('\r\n')[0]}`));
      const length = /^content-length:\s*(\d+)/im.exec(head);
      const complete = length !== null ? buf.length >= end + 4 + Number(length[1]) : buf.endsWith('0\r\n\r\n');
      if (!complete) return;
      s.removeAllListeners();
      s.pause();
      resolve(s);
    });
    s.write(`GET / HTTP/1.1\r\nHost: ${host}\r\n\r\n`);
  });
}

/** Opens `n` keep-alive connections, each after one request (100 opening at a time); counts the ones closed afterwards. */
async function openIdle(port: number, n: number): Promise<{ sockets: Socket[]; closed: () => number }> {
  const sockets: Socket[] = [];
  let closed = 0;
  let next = 0;
  const lane = async () => {
    while (next < n) {
      const i = next++;
      const s = await openOne(port, `127.0.0.${2 + (i % sources)}`);
      s.on('error', () => undefined);
      s.once('close', () => closed++);
      sockets.push(s);
    }
  };
  try {
    await Promise.all(Array.from({ length: 100 }, lane));
  } catch (e) {
    for (const s of sockets) s.destroy();
    throw e;
  }
  return { sockets, closed: () => closed };
}

/** nginx for idle connections: room for all of them in either worker, keep-alive far above the measurement. */
async function nginxIdle(dir: string, backendPort: number): Promise<Peer> {
  const port = await freePort();
  return startNginx('nginx', dir, 'idle.conf', `${nginxCommon(dir, 'auto', 16384)}
http {
  access_log off;
  keepalive_timeout ${keepAliveSeconds}s;
  upstream backend { server 127.0.0.1:${backendPort}; keepalive 128; }
  server {
    listen 127.0.0.1:${port} backlog=4096;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
`, port);
}

/**
 * HAProxy for idle connections. It reserves two file descriptors per connection (client and server side) and by
 * default refuses to start when it cannot raise its limit that far: `no strict-limits` lets it run within ours.
 */
function haproxyIdle(dir: string, backendPort: number): Promise<Peer> {
  return startHaproxy(dir, backendPort, {
    file: 'haproxy-idle.cfg',
    global: ['maxconn 12000', 'no strict-limits'],
    defaults: [`timeout client ${keepAliveSeconds}s`, `timeout http-keep-alive ${keepAliveSeconds}s`],
  });
}

const mib = (x: number) => (x / 2 ** 20).toFixed(1);
const closedEarly = (s: readonly Sample[]) => {
  const n = s.reduce((a, x) => a + x.closedEarly, 0);
  return n === 0 ? '' : ` (**${n} closed before the measurement**)`;
};

/**
 * Holds `connections` idle keep-alive connections open to nginx, HAProxy and Tarmac's proxy (one process and a
 * two-worker cluster), each started fresh for every round, measures the servers' memory before and after, and
 * returns the markdown section.
 */
export async function benchIdle(o: IdleBenchOptions): Promise<string> {
  const n = o.connections ?? 10_000;
  ensureFileLimit(n + 1024);
  const dir = join(o.dir, 'idle');
  await mkdir(dir, { recursive: true });
  const started = new Date();
  const backend = await startNginxBackend(dir);
  try {
    let fresh = 0;
    const tarmac = (workers: number | 'haproxy') => async (d: string) => {
      const data = join(d, `tarmac-${++fresh}`);
      await mkdir(data);
      const nodeOptions = `${process.env['NODE_OPTIONS'] ?? ''} --import=${memReport}`.trim();
      const name = workers === 'haproxy' ? 'Tarmac, HAProxy engine' : workers > 1 ? `Tarmac cluster x${workers}` : 'Tarmac';
      return startNodeScript(name, 'tarmac-proxy.ts', [data, String(backend.port), String(workers)], [], { NODE_OPTIONS: nodeOptions });
    };
    const targets: Target[] = [
      { name: 'nginx', node: false, start: (d) => nginxIdle(d, backend.port) },
      { name: 'HAProxy', node: false, start: (d) => haproxyIdle(d, backend.port) },
      { name: 'Tarmac', node: true, start: tarmac(1) },
      { name: 'Tarmac cluster x2', node: true, start: tarmac(2) },
      // HAProxy holds the connections: its processes count, with the idle Node proxy behind it.
      { name: 'Tarmac, HAProxy engine', node: false, start: tarmac('haproxy') },
    ];
    const measure = async (t: Target): Promise<Sample> => {
      const peer = await t.start(dir);
      try {
        // Warm-up (JIT, pools, the upstream connection), then let it go: not counted.
        const warm = await openIdle(peer.port, 200);
        for (const s of warm.sockets) s.destroy();
        const before = await memoryOf(peer, t.node);
        const t0 = performance.now();
        const idle = await openIdle(peer.port, n);
        const openSeconds = (performance.now() - t0) / 1000;
        try {
          const after = await memoryOf(peer, t.node);
          // Should the server time out some while the others were still opening, the row says so.
          return { before, after, openSeconds, closedEarly: idle.closed() };
        } finally {
          for (const s of idle.sockets) s.destroy();
        }
      } finally {
        await peer.stop();
      }
    };
    const loadOf = watchLoad();
    const samples = new Map<string, Sample[]>();
    for (let round = 0; round < o.rounds; round++) {
      for (let i = 0; i < targets.length; i++) {
        const t = targets[(i + round) % targets.length]!;
        samples.set(t.name, [...(samples.get(t.name) ?? []), await measure(t)]);
      }
    }
    const load = loadOf();
    const rows = targets.map((t) => {
      const s = samples.get(t.name)!;
      const per = (f: (m: Memory) => number | undefined) => median(s.map((x) => ((f(x.after) ?? NaN) - (f(x.before) ?? NaN)) / n));
      const perConn = s.map((x) => (x.after.rss - x.before.rss) / n);
      const heap = per((m) => m.heap);
      return `| ${t.name} | ${mib(median(s.map((x) => x.before.rss)))} | ${mib(median(s.map((x) => x.after.rss)))} | ${per((m) => m.rss).toFixed(0)} | ${Math.min(...perConn).toFixed(0)}–${Math.max(...perConn).toFixed(0)} | ${Number.isFinite(heap) ? heap.toFixed(0) : '–'} | ${median(s.map((x) => x.openSeconds)).toFixed(1)}${closedEarly(s)} |`;
    });
    return `
## Memory per ${n.toLocaleString('en')} idle keep-alive connections

Run ${started.toISOString()} on: ${machine()}. ${load}

Method: for each server, started fresh in every round (nginx with one worker per core, HAProxy with one thread per
core, Tarmac's proxy as one process, as two \`node:cluster\` workers and with the HAProxy engine; each in front of the same nginx \`return 200\`
backend), a warm-up of 200 connections is opened and closed, the server's memory is read, then ${n.toLocaleString('en')} HTTP/1.1
connections are opened from the benchmark's process (100 at a time, spread over ${sources} loopback source addresses), each
sends one request, reads its response and then stays open and idle, and the memory is read again while all are still
open (the benchmark counts any closed by then, and the table would say so). Memory is RSS from /proc/PID/status summed
over the server's processes (the nginx master and workers, the cluster's primary and workers; for the HAProxy engine
HAProxy's processes and the Node proxy behind it, which holds none of these connections); for Tarmac also V8's heap used plus external memory
(Buffers) summed over its processes, read by each process after a full GC on a signal (bench/proxy/mem-report.mjs).
Bytes per connection is (after − before) / ${n.toLocaleString('en')}, the median of ${o.rounds} rounds (interleaved, order rotated).
Socket buffers live in the kernel and are not counted for anyone. Keep-alive timeouts: nginx and HAProxy ${keepAliveSeconds} s,
Tarmac its default 30 s, longer than opening and measuring took.

| server | RSS before MiB | RSS after MiB | RSS bytes/connection | range | V8 heap + external bytes/connection | seconds to open all |
|---|---|---|---|---|---|---|
${rows.join('\n')}

An idle connection in Tarmac's proxy is a node:http connection: a \`net.Socket\` with its stream state and listeners and
node:http's per-connection state are JavaScript objects (the V8 column), and the libuv TCP handle and its wrap are
native memory from malloc (the rest of the RSS). nginx and HAProxy keep an idle keep-alive connection in a small C
structure and give its request buffers back while it waits. In the cluster the primary accepts every connection and
hands it to a worker over IPC, which is why it opens no faster than one process here.
`;
  } finally {
    await backend.stop();
  }
}
