// `node --import tsx bench/proxy/profile.ts [SECONDS]`: Tarmac's proxy under wrk at 64 connections with --cpu-prof; prints the hottest functions.
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startNginxBackend, startNodeScript, treeCpuSeconds } from './processes.ts';
import { runWrk, writeWrkScript } from './wrk.ts';

interface ProfileNode { id: number; callFrame: { functionName: string; url: string; lineNumber: number }; hitCount?: number; children?: number[] }

const seconds = Number(process.argv[2] ?? 5);
const dir = await mkdtemp(join(tmpdir(), 'tarmac-proxy-prof-'));
const backend = await startNginxBackend(dir);
const profDir = join(dir, 'prof');
try {
  const proxy = await startNodeScript('Tarmac', 'tarmac-proxy.ts', [dir, String(backend.port)], ['--cpu-prof', `--cpu-prof-dir=${profDir}`]);
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
  const file = (await readdir(profDir)).find((f) => f.endsWith('.cpuprofile'));
  if (!file) throw new Error('no profile written');
  const prof = JSON.parse(await readFile(join(profDir, file), 'utf8')) as { nodes: ProfileNode[] };
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
} finally {
  await backend.stop();
  await rm(dir, { recursive: true, force: true });
}
