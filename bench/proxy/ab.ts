// A/B of proxy builds under wrk at 64 connections: CPU µs per request (robust on a shared machine), req/s and p99, interleaved rounds.
// Usage: node --import tsx bench/proxy/ab.ts ROUNDS SECONDS TARGET...; a TARGET is NAME=KIND[@ROOT][+NODEFLAG...]:
// KIND tarmac (one process), tarmac2 (cluster x2), tarmach (with the HAProxy data plane), undici (bare node:http + undici, the floor) or undici2 (that as cluster x2); ROOT another checkout
// (a copy of this tree with node_modules) to compare against; NODEFLAGs are passed to node, e.g. +--max-semi-space-size=16.
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type Peer, startNginxBackend, startNodeScript, treeCpuSeconds } from './processes.ts';
import { runWrk, writeWrkScript } from './wrk.ts';
import { median } from './stats.ts';

const [roundsArg, secondsArg, ...specs] = process.argv.slice(2);
const rounds = Number(roundsArg);
const seconds = Number(secondsArg);
if (!(rounds > 0) || !(seconds > 0) || specs.length === 0) throw new Error('usage: ab.ts ROUNDS SECONDS NAME=KIND[@ROOT][+NODEFLAG...]...');

const dir = await mkdtemp(join(tmpdir(), 'tarmac-proxy-ab-'));
const peers: Peer[] = [];
try {
  const backend = await startNginxBackend(dir);
  peers.push(backend);
  const targets: { name: string; peer: Peer; runs: { cpu: number; rps: number; p99: number }[] }[] = [];
  for (const spec of specs) {
    const eq = spec.indexOf('=');
    const name = spec.slice(0, eq);
    const rest = eq === -1 ? undefined : spec.slice(eq + 1);
    if (rest === undefined) throw new Error(`target ${spec}: NAME=KIND expected`);
    const [kindRoot, ...flags] = rest.split('+');
    const [kind, root] = kindRoot!.split('@') as [string, string | undefined];
    const bare = kind === 'undici' || kind === 'undici2';
    const script = bare ? 'node-peer.ts' : 'tarmac-proxy.ts';
    const data = join(dir, name);
    await mkdir(data);
    const args = bare ? [kind!, String(backend.port)] : [data, String(backend.port), kind === 'tarmac2' ? '2' : kind === 'tarmach' ? 'haproxy' : '1'];
    const path = root === undefined ? script : join(root, 'bench/proxy', script);
    const peer = await startNodeScript(name, path, args, flags);
    peers.push(peer);
    targets.push({ name, peer, runs: [] });
  }
  const wrk = await writeWrkScript(dir);
  for (const t of targets) await runWrk(wrk, t.peer.port, 64, 1, 'bench.localhost');
  for (let r = 0; r < rounds; r++) {
    const order = [...targets.slice(r % targets.length), ...targets.slice(0, r % targets.length)];
    for (const t of order) {
      const cpu0 = treeCpuSeconds(t.peer.pid);
      const w = await runWrk(wrk, t.peer.port, 64, seconds, 'bench.localhost');
      const cpu = treeCpuSeconds(t.peer.pid) - cpu0;
      if (w.errors > 0) throw new Error(`${t.name}: ${w.errors} errors`);
      t.runs.push({ cpu: (cpu / w.requests) * 1e6, rps: w.rps, p99: w.p99 });
    }
  }
  for (const t of targets) {
    const cpu = t.runs.map((x) => x.cpu);
    process.stdout.write(`${t.name.padEnd(16)} CPU µs/req median ${median(cpu).toFixed(1)} min ${Math.min(...cpu).toFixed(1)} (${cpu.map((x) => x.toFixed(1)).join(' ')})  req/s ${median(t.runs.map((x) => x.rps)).toFixed(0)}  p99 µs ${median(t.runs.map((x) => x.p99)).toFixed(0)}\n`);
  }
} finally {
  for (const p of peers.reverse()) await p.stop();
  await rm(dir, { recursive: true, force: true });
}
