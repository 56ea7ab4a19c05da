// Proxy benchmark: wrk through nginx, HAProxy, Tarmac's proxy and the Node peers to one nginx backend, interleaved, as markdown;
// then TLS handshakes, WebSocket round trips and memory per idle connection. BENCH_PROXY_PARTS=http,ws,idle picks parts.
import { spawnSync } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { cpus, release, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import {
  type Peer, startHaproxy, startNginxBackend, startNginxProxy, startNodeScript, treeCpuSeconds,
} from './processes.ts';
import { runWrk, writeWrkScript, type WrkResult } from './wrk.ts';
import { proxyWorkerHeapFlags } from '../../src/proxy/index.ts';
import { benchTls } from './tls.ts';
import { benchWebSocket } from './ws.ts';
import { benchIdle } from './idle.ts';
import { spliceSections } from './sections.ts';
import { loadavg, machineBusySeconds, median } from './stats.ts';

export interface BenchProxyOptions {
  /** Rounds of every target at every connection count, interleaved. Default 3 (env BENCH_PROXY_ROUNDS). */
  rounds?: number;
  /** Seconds per wrk run. Default 3 (env BENCH_PROXY_SECONDS). */
  seconds?: number;
  /** Connection counts. Default [1, 64]. */
  connections?: readonly number[];
}

interface Target {
  readonly name: string;
  /** Where wrk connects. */
  readonly port: number;
  /** Root of the process tree whose CPU is charged to this target. */
  readonly cpuPid: number;
  readonly node: boolean;
  readonly tarmac: boolean;
  /** The bare node:http + undici proxy: the floor of what Tarmac's proxy can cost in Node, not a peer to beat. */
  readonly floor: boolean;
}

interface Run extends WrkResult { cpuSeconds: number }

const host = 'bench.localhost';

function envNumber(name: string): number | undefined {
  const v = process.env[name];
  return v === undefined || v === '' ? undefined : Number(v);
}

function version(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return `${r.stdout ?? ''}${r.stderr ?? ''}`.split('\n')[0]?.trim() || 'absent';
}

async function packageVersion(name: string): Promise<string> {
  try {
    const json = JSON.parse(await readFile(new URL(`../../node_modules/${name}/package.json`, import.meta.url), 'utf8')) as { version: string };
    return json.version;
  } catch {
    return 'absent';
  }
}

const parts = ['http', 'ws', 'idle'] as const;
const resultsFile = new URL('../results/proxy.md', import.meta.url);

/**
 * Runs the benchmark's parts (env BENCH_PROXY_PARTS, comma-separated; all by default) and returns the report: `http`
 * is wrk's sections and the TLS handshakes, `ws` the WebSocket round trips, `idle` the memory per idle connection.
 * Without `http`, the sections measured replace their namesakes in the committed results and the rest is kept.
 */
export async function benchProxy(opts: BenchProxyOptions = {}): Promise<string> {
  const wanted = new Set((process.env['BENCH_PROXY_PARTS'] ?? parts.join(',')).split(','));
  const unknown = [...wanted].filter((p) => !(parts as readonly string[]).includes(p));
  if (unknown.length > 0) throw new Error(`BENCH_PROXY_PARTS: unknown part ${unknown.join(', ')} (parts: ${parts.join(', ')})`);
  const rounds = opts.rounds ?? envNumber('BENCH_PROXY_ROUNDS') ?? 3;
  const seconds = opts.seconds ?? envNumber('BENCH_PROXY_SECONDS') ?? 3;
  const sections = wanted.has('http') ? [await benchHttp({ ...opts, rounds, seconds })] : [];
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-bench-proxy-'));
  try {
    if (wanted.has('ws')) sections.push(await benchWebSocket({ dir, rounds, seconds }));
    if (wanted.has('idle')) sections.push(await benchIdle({ dir, rounds }));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  return wanted.has('http') ? sections.join('') : spliceSections(await readFile(resultsFile, 'utf8'), sections.join(''));
}

/** wrk's sections and the TLS handshakes (bounded: about rounds x targets x connection counts x seconds). */
async function benchHttp(opts: BenchProxyOptions): Promise<string> {
  const rounds = opts.rounds ?? envNumber('BENCH_PROXY_ROUNDS') ?? 3;
  const seconds = opts.seconds ?? envNumber('BENCH_PROXY_SECONDS') ?? 3;
  const conns = opts.connections ?? [1, 64];
  const started = new Date();
  const loadBefore = loadavg();
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-bench-proxy-'));
  const peers: Peer[] = [];
  try {
    const script = await writeWrkScript(dir);
    const backend = await startNginxBackend(dir);
    peers.push(backend);
    const start = async (p: Promise<Peer>) => { const peer = await p; peers.push(peer); return peer; };
    const nginx = await start(startNginxProxy(dir, backend.port));
    const haproxy = await start(startHaproxy(dir, backend.port));
    // The young generation sized as the host's start command (bin/tarmac.mjs) and the cluster's workers have it.
    const tarmac = await start(startNodeScript('Tarmac', 'tarmac-proxy.ts', [dir, String(backend.port)], [...proxyWorkerHeapFlags]));
    const tarmac2 = await start(startNodeScript('Tarmac cluster x2', 'tarmac-proxy.ts', [dir, String(backend.port), '2']));
    const tarmacH = await start(startNodeScript('Tarmac, HAProxy engine', 'tarmac-proxy.ts', [dir, String(backend.port), 'haproxy'], [...proxyWorkerHeapFlags]));
    const httpProxy = await start(startNodeScript('http-proxy', 'node-peer.ts', ['http-proxy', String(backend.port)]));
    const fastify = await start(startNodeScript('@fastify/http-proxy', 'node-peer.ts', ['fastify', String(backend.port)]));
    const bare = await start(startNodeScript('bare node:http + undici', 'node-peer.ts', ['undici', String(backend.port)], [...proxyWorkerHeapFlags]));
    const bare2 = await start(startNodeScript('bare, cluster x2', 'node-peer.ts', ['undici2', String(backend.port)], [...proxyWorkerHeapFlags]));
    const target = (name: string, p: Peer, flags: { node?: boolean; tarmac?: boolean; floor?: boolean } = {}): Target =>
      ({ name, port: p.port, cpuPid: p.pid, node: flags.node ?? false, tarmac: flags.tarmac ?? false, floor: flags.floor ?? false });
    const targets: Target[] = [
      target('direct (nginx backend)', backend),
      target('nginx', nginx),
      target('HAProxy', haproxy),
      target('Tarmac', tarmac, { node: true, tarmac: true }),
      target('Tarmac cluster x2', tarmac2, { node: true, tarmac: true }),
      target('Tarmac, HAProxy engine', tarmacH, { tarmac: true }),
      target('http-proxy', httpProxy, { node: true }),
      target('@fastify/http-proxy', fastify, { node: true }),
      target(bare.name, bare, { node: true, floor: true }),
      target(bare2.name, bare2, { node: true, floor: true }),
    ];

    const once = async (t: Target, c: number, secs: number): Promise<Run> => {
      const cpu0 = treeCpuSeconds(t.cpuPid);
      const r = await runWrk(script, t.port, c, secs, host);
      return { ...r, cpuSeconds: treeCpuSeconds(t.cpuPid) - cpu0 };
    };
    // Warm-up (JIT, pools, nginx upstream keep-alive): not counted.
    for (const t of targets) {
      const w = await once(t, Math.max(...conns), 1);
      if (w.requests === 0 || w.errors > w.requests / 100) throw new Error(`${t.name} failed the warm-up: ${w.errors} errors in ${w.requests} requests`);
    }
    const runs = new Map<string, Run[]>();
    const t0 = performance.now();
    const busy0 = machineBusySeconds();
    const ours0 = treeCpuSeconds(process.pid);
    for (let round = 0; round < rounds; round++) {
      for (const c of conns) {
        // A B A B, with the order rotated each round so no target always runs right after the same one.
        for (let i = 0; i < targets.length; i++) {
          const t = targets[(i + round) % targets.length]!;
          const key = `${t.name}@${c}`;
          runs.set(key, [...(runs.get(key) ?? []), await once(t, c, seconds)]);
        }
      }
    }
    const loadAfter = loadavg();
    // CPU the rest of the machine used while we measured (other people's tests, say): context for every figure.
    const others = machineBusySeconds() - busy0 - (treeCpuSeconds(process.pid) - ours0);
    const elapsed = (performance.now() - t0) / 1000;
    const otherLoad = others / elapsed;
    const versions = {
      nginx: version('nginx', ['-v']).replace(/^nginx version: /, ''),
      haproxy: version('haproxy', ['-v']).replace(/ - https.*$/, ''),
      wrk: version('wrk', ['-v']).replace(/ \[.*$/, ''),
      undici: await packageVersion('undici'),
      httpProxy: await packageVersion('http-proxy'),
      fastify: await packageVersion('fastify'),
      fastifyProxy: await packageVersion('@fastify/http-proxy'),
    };
    const tls = await benchTls({ dir, backendPort: backend.port, rounds, seconds });
    return report({ started, rounds, seconds, conns, targets, runs, loadBefore, loadAfter, otherLoad, versions }) + tls;
  } finally {
    for (const p of peers.reverse()) await p.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

interface Summary { rps: number; p50: number; p99: number; cpuPerReq: number; errors: number; rpsRuns: number[] }

function summarize(rs: readonly Run[]): Summary {
  const requests = rs.reduce((n, r) => n + r.requests, 0);
  return {
    rps: median(rs.map((r) => r.rps)),
    p50: median(rs.map((r) => r.p50)),
    p99: median(rs.map((r) => r.p99)),
    cpuPerReq: requests === 0 ? NaN : (rs.reduce((n, r) => n + r.cpuSeconds, 0) / requests) * 1e6,
    errors: rs.reduce((n, r) => n + r.errors, 0),
    rpsRuns: rs.map((r) => r.rps),
  };
}

function report(o: {
  started: Date; rounds: number; seconds: number; conns: readonly number[]; targets: readonly Target[];
  runs: ReadonlyMap<string, Run[]>; loadBefore: string; loadAfter: string; otherLoad: number; versions: Record<string, string>;
}): string {
  const s = (t: Target, c: number) => summarize(o.runs.get(`${t.name}@${c}`) ?? []);
  const [low, high] = [Math.min(...o.conns), Math.max(...o.conns)];
  const direct = o.targets[0]!;
  const nginx = o.targets.find((t) => t.name === 'nginx')!;
  const tarmacs = o.targets.filter((t) => t.tarmac);
  const n = (x: number, d = 0) => (Number.isFinite(x) ? x.toFixed(d) : '–');
  const v = o.versions;

  const lowRows = o.targets.map((t) => {
    const x = s(t, low);
    const added = t === direct ? '–' : n(x.p50 - s(direct, low).p50);
    return `| ${t.name} | ${n(x.rps)} | ${x.p50} | ${x.p99} | ${added} | ${n(x.cpuPerReq, 1)} | ${x.errors} |`;
  });
  const ng = s(nginx, high);
  // Each round's run against nginx's run of the same round, then the median: drift between rounds cancels out.
  const ratioToNginx = (x: Summary) => median(x.rpsRuns.map((r, i) => r / (ng.rpsRuns[i] ?? NaN)));
  const highRows = o.targets.map((t) => {
    const x = s(t, high);
    const spread = `${n(Math.min(...x.rpsRuns))}–${n(Math.max(...x.rpsRuns))}`;
    return `| ${t.name} | ${n(x.rps)} | ${spread} | ${n(ratioToNginx(x), 2)} | ${x.p50} | ${x.p99} | ${n(x.p99 / ng.p99, 2)} | ${n(x.cpuPerReq, 1)} | ${x.errors} |`;
  });

  const checks: string[] = [];
  const peers = o.targets.filter((t) => t.node && !t.tarmac && !t.floor);
  const floors = o.targets.filter((t) => t.floor);
  for (const t of tarmacs) {
    const added = s(t, low).p50 - s(direct, low).p50;
    const h = s(t, high);
    const bestPeer = Math.max(...peers.map((p) => s(p, high).rps));
    const mark = (ok: boolean) => (ok ? 'met' : '**not met**');
    checks.push(
      `- ${t.name}: added p50 at ${low} connection ${n(added)} µs (target ≤ 500 µs, nginx ${n(s(nginx, low).p50 - s(direct, low).p50)} µs): ${mark(added <= 500)}`,
      `- ${t.name}: ${n(ratioToNginx(h), 2)} of nginx's requests/s at ${high} connections (target ≥ 0.45): ${mark(ratioToNginx(h) >= 0.45)}`,
      `- ${t.name}: ahead of every Node peer at ${high} connections (${n(h.rps)} vs best peer ${n(bestPeer)} req/s): ${mark(h.rps > bestPeer)}`,
      `- ${t.name}: p99 at ${high} connections ${n(h.p99)} µs, ${n(h.p99 / ng.p99, 2)}x nginx's (target ≤ 2x): ${mark(h.p99 <= 2 * ng.p99)}`,
    );
  }
  const limits = tarmacs.length === 0 ? '' : `
## What limits it

Every target shares the same two cores with wrk (one thread) and the nginx backend (one worker), so throughput at
${high} connections is CPU per request against what is left of two cores. CPU per proxied request, measured from
/proc over each target's whole process tree: nginx ${n(ng.cpuPerReq, 1)} µs, HAProxy ${n(s(o.targets.find((t) => t.name === 'HAProxy')!, high).cpuPerReq, 1)} µs,
${tarmacs.map((t) => `${t.name} ${n(s(t, high).cpuPerReq, 1)} µs`).join(', ')}; the bare node:http + undici proxy
${floors.map((t) => `${t.name === 'bare node:http + undici' ? 'in one process' : 'as two cluster workers'} ${n(s(t, high).cpuPerReq, 1)} µs (${n(ratioToNginx(s(t, high)), 2)} of nginx's requests/s)`).join(', ')}:
the difference between the Node engine and those floors is what Tarmac's own work (routing, Fly headers, request ids,
concurrency accounting, metrics) costs; a single Node process also uses one core at most, where nginx and HAProxy
spread over both. In Node, HTTP parsing and the JS↔native crossings of node:http and undici are most of the cost, and
the cluster's p99 suffers from its workers, wrk and the backend time-sharing two cores. The HAProxy engine (the host's
default where HAProxy is installed) takes Node off the hot path: HAProxy routes, balances, limits and adds Fly's
headers from the config Tarmac generates, and what Tarmac still does per request is read one line of HAProxy's log
ring for its request events (metrics); the CPU it adds over bare HAProxy is that line (HAProxy writing it, Tarmac
parsing it) and the extra header rules.
`;

  return `# Proxy (issue 3)

Run ${o.started.toISOString()} on: ${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, ${Math.round(totalmem() / 2 ** 30)} GiB, Linux ${release()},
Node ${process.version}; ${v['nginx']}, ${v['haproxy']}, ${v['wrk']}; undici ${v['undici']}, http-proxy ${v['httpProxy']},
fastify ${v['fastify']} with @fastify/http-proxy ${v['fastifyProxy']}. Load average before ${o.loadBefore}, after ${o.loadAfter};
processes other than the benchmark's used ${n(o.otherLoad, 2)} cores on average while it ran (${o.otherLoad > 0.2 ? 'a busy machine: compare ratios, not absolutes' : 'a quiet machine'}).

Method: one nginx backend (\`return 200\`, one worker) on loopback; wrk (one thread, keep-alive, \`Host: ${host}\`)
drives it directly and through each proxy. Each proxy keeps connections to the backend alive. nginx (one worker per
core) and HAProxy (one thread per core) use every core; the Node proxies (Tarmac's, http-proxy, @fastify/http-proxy) run
one process each, and Tarmac's proxy also as \`startProxyCluster\` with two \`node:cluster\` workers. "Tarmac, HAProxy
engine" is \`startHaproxyPlane\` (the host's default where HAProxy is installed): HAProxy (one thread per core) in front,
serving the app from the config Tarmac generates, Tarmac reading every request's event from HAProxy's log ring. Tarmac's proxy routes by Host through its routing table built from a real SQLite catalog (one app,
one started machine at 127.0.0.1), adding Fly's forwarding headers and request ids, with its Prometheus metrics counting
every request as in the host, and the young generation the host and the cluster's workers start with
(\`${proxyWorkerHeapFlags.join(' ')}\`). "bare node:http + undici" is the same data path without any of Tarmac's own
work (hop-by-hop headers stripped, X-Forwarded-For added, \`dispatch()\` straight into the response), in one process
and as two \`node:cluster\` workers: the floor Tarmac's proxy is measured against, not a peer to beat. After a one-second warm-up of every
target, ${o.rounds} rounds of ${o.seconds} s runs, interleaved (every target at one connection count, then the next
count, the target order rotated each round). Figures are medians over rounds; the ratio to nginx is the median of
each round's ratio to nginx's run of the same round; latencies in µs from wrk's histogram;
CPU µs/request is user+system time of the target's process tree divided by requests (for "direct", the backend's).

## 1 connection: added latency

| target | req/s | p50 µs | p99 µs | added p50 µs | CPU µs/req | errors |
|---|---|---|---|---|---|---|
${lowRows.join('\n')}

## ${high} connections: throughput

| target | req/s | req/s range | ratio to nginx | p50 µs | p99 µs | p99 / nginx's | CPU µs/req | errors |
|---|---|---|---|---|---|---|---|---|
${highRows.join('\n')}

## Against the issue's targets

${checks.join('\n')}
${limits}`;
}
