// `node --import tsx bench/proxy/profile.ts [SECONDS] [FUNCTION_REGEXP] [WORKERS]`: Tarmac's proxy under wrk at 64 connections with
// --cpu-prof; prints the hottest functions, self time by place, and the inclusive time of Tarmac's functions (and those matching
// the regexp). WORKERS > 1 runs it as a proxy cluster and reports the busiest worker's main thread.
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { proxyWorkerHeapFlags } from '../../src/proxy/index.ts';
import { startNginxBackend, startNodeScript, treeCpuSeconds } from './processes.ts';
import { runWrk, writeWrkScript } from './wrk.ts';

interface ProfileNode { id: number; callFrame: { functionName: string; url: string; lineNumber: number }; hitCount?: number; children?: number[] }

const seconds = Number(process.argv[2] ?? 5);
/** Function names (a regular expression, argv[3]) whose inclusive time is reported besides Tarmac's own. */
const focus = new RegExp(process.argv[3] ?? '(?!)');
const workers = Number(process.argv[4] ?? 1);
const dir = await mkdtemp(join(tmpdir(), 'tarmac-proxy-prof-'));
const backend = await startNginxBackend(dir);
const profDir = join(dir, 'prof');
try {
  const profFlags = ['--cpu-prof', `--cpu-prof-dir=${profDir}`];
  const proxy = workers > 1
    ? await startNodeScript('Tarmac cluster', 'tarmac-proxy.ts', [dir, String(backend.port), String(workers)], [], { BENCH_WORKER_NODE_ARGS: profFlags.join(' ') })
    : await startNodeScript('Tarmac', 'tarmac-proxy.ts', [dir, String(backend.port)], [...proxyWorkerHeapFlags, ...profFlags]);
  try {
    const script = await writeWrkScript(dir);
    await runWrk(script, proxy.port, 64, 1, 'bench.localhost');
    const cpu0 = treeCpuSeconds(proxy.pid);
    const r = await runWrk(script, proxy.port, 64, seconds, 'bench.localhost');
    const cpu = treeCpuSeconds(proxy.pid) - cpu0;
    process.stdout.write(`${r.rps.toFixed(0)} req/s, p50 ${r.p50} µs, p99 ${r.p99} µs, ${((cpu / r.requests) * 1e6).toFixed(1)} CPU µs/req, ${r.errors} errors\n`);
  } finally {
    await proxy.stop();
  }
  // One profile per thread (a process's main thread and tsx's loader thread): the one that did the most is the proxy's.
  let prof: { nodes: ProfileNode[] } | undefined;
  let busiest = -1;
  for (const f of (await readdir(profDir)).filter((f) => f.endsWith('.cpuprofile'))) {
    const p = JSON.parse(await readFile(join(profDir, f), 'utf8')) as { nodes: ProfileNode[] };
    const busy = p.nodes.reduce((a, n) => a + (n.callFrame.functionName === '(idle)' ? 0 : n.hitCount ?? 0), 0);
    if (busy > busiest) { busiest = busy; prof = p; }
  }
  if (!prof) throw new Error('no profile written');
  const self = new Map<string, number>();
  let total = 0;
  for (const n of prof.nodes) {
    const hits = n.hitCount ?? 0;
    total += hits;
    const f = n.callFrame;
    const key = `${f.functionName || '(anonymous)'} ${f.url.replace(/^.*node_modules\//, '').replace(/^file:\/\/.*\/src\//, 'src/')}:${f.lineNumber + 1}`;
    self.set(key, (self.get(key) ?? 0) + hits);
  }
  const top = [...self].sort((a, b) => b[1] - a[1]).slice(0, 40);
  for (const [k, v] of top) process.stdout.write(`${((v / total) * 100).toFixed(1).padStart(5)}%  ${k}\n`);
  // Self time by where the code lives, and inclusive time of Tarmac's own functions (what they cost with their callees).
  const byPlace = new Map<string, number>();
  for (const n of prof.nodes) {
    const url = n.callFrame.url;
    const place = url === '' ? `(native) ${n.callFrame.functionName}` : url.includes('node_modules/') ? url.replace(/^.*node_modules\/([^/]+)\/.*$/, '$1')
      : url.includes('/src/') ? url.replace(/^.*\/src\//, 'src/') : url.startsWith('node:') ? 'node internals' : url;
    byPlace.set(place, (byPlace.get(place) ?? 0) + (n.hitCount ?? 0));
  }
  process.stdout.write('\nself time by place:\n');
  for (const [k, v] of [...byPlace].sort((a, b) => b[1] - a[1]).slice(0, 25)) process.stdout.write(`${((v / total) * 100).toFixed(1).padStart(5)}%  ${k}\n`);
  const byId = new Map(prof.nodes.map((n) => [n.id, n]));
  const inclusive = (n: ProfileNode): number => (n.hitCount ?? 0) + (n.children ?? []).reduce((a, c) => a + inclusive(byId.get(c)!), 0);
  const tarmac = new Map<string, number>();
  const walk = (n: ProfileNode, inside: Set<string>): void => {
    const f = n.callFrame;
    const key = f.url.includes('/src/') || f.url.includes('prom-client') || f.url.includes('diagnostics_channel') || focus.test(f.functionName)
      ? `${f.functionName || '(anonymous)'} ${f.url.replace(/^.*\/src\//, 'src/').replace(/^.*node_modules\//, '')}:${f.lineNumber + 1}` : undefined;
    // Count a function's subtree once even when it recurses or calls itself through others.
    if (key !== undefined && !inside.has(key)) {
      tarmac.set(key, (tarmac.get(key) ?? 0) + inclusive(n));
      inside = new Set(inside).add(key);
    }
    for (const c of n.children ?? []) walk(byId.get(c)!, inside);
  };
  walk(prof.nodes[0]!, new Set());
  process.stdout.write('\ninclusive time of src/, prom-client and diagnostics_channel functions:\n');
  for (const [k, v] of [...tarmac].sort((a, b) => b[1] - a[1]).slice(0, 45)) process.stdout.write(`${((v / total) * 100).toFixed(1).padStart(5)}%  ${k}\n`);
} finally {
  await backend.stop();
  await rm(dir, { recursive: true, force: true });
}
