// Benchmark: POST /machines to the first proxied 200 (warm and cold image), and start of a stopped machine to first 200.
import { request } from 'undici';
import { cpus, totalmem, release } from 'node:os';
import { execFileSync } from 'node:child_process';
import { startRegistry } from '../test/helpers/registry.ts';
import { buildAndPushImage, httpImageCommand } from '../test/helpers/images.ts';
import { startTestHost, type TestHost } from '../test/helpers/host.ts';
import type { MachineConfig } from '../src/client/index.ts';

export interface Sample { name: string; ms: number[] }

const runs = Number(process.env['BENCH_RUNS'] ?? 20);

function config(image: string): MachineConfig {
  return { image, services: [{ protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }] }], restart: { policy: 'no' } };
}

/** Polls the proxy until the app answers 200 from machine `id`; resolves with the time it did. */
async function firstResponse(h: TestHost, app: string, id: string): Promise<number> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      const res = await request(`${h.proxyUrl}/`, { headers: { host: `${app}.localhost` } });
      const body = (await res.body.text()).trim();
      if (res.statusCode === 200 && body === id) return performance.now();
    } catch { /* not yet */ }
    if (Date.now() > deadline) throw new Error(`machine ${id} never answered`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

export function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)] ?? NaN;
}

export async function benchMachineStart(): Promise<Sample[]> {
  const registry = await startRegistry();
  const h = await startTestHost();
  try {
    await h.client.createApp({ app_name: 'bench', org_slug: 'personal' });
    const warmRef = await buildAndPushImage(registry.host, 'warm', { cmd: ['sh', '-c', httpImageCommand] });
    // Warm the image cache with one machine.
    const w = await h.client.createMachine('bench', { config: config(warmRef) });
    await firstResponse(h, 'bench', w.id);
    await h.client.deleteMachine('bench', w.id, { force: true });
    await h.client.waitMachine('bench', w.id, { state: 'destroyed', timeout: 30 });

    const warm: number[] = [], cold: number[] = [], start: number[] = [];
    for (let i = 0; i < runs; i++) {
      // Cold: an image nobody pulled yet (distinct content, so distinct layer digests).
      const coldRef = await buildAndPushImage(registry.host, `cold${i}`, { cmd: ['sh', '-c', httpImageCommand], files: { [`etc/bench-${i}`]: String(i) } });
      for (const [ref, into] of [[warmRef, warm], [coldRef, cold]] as const) {
        const t0 = performance.now();
        const m = await h.client.createMachine('bench', { config: config(ref) });
        into.push((await firstResponse(h, 'bench', m.id)) - t0);
        if (into === warm) {
          await h.client.stopMachine('bench', m.id, { timeout: 5 });
          await h.client.waitMachine('bench', m.id, { state: 'stopped', timeout: 30 });
          const t1 = performance.now();
          await h.client.startMachine('bench', m.id);
          start.push((await firstResponse(h, 'bench', m.id)) - t1);
        }
        await h.client.deleteMachine('bench', m.id, { force: true });
        await h.client.waitMachine('bench', m.id, { state: 'destroyed', timeout: 30 });
      }
    }
    return [
      { name: 'create → first response, warm image', ms: warm },
      { name: 'create → first response, cold image', ms: cold },
      { name: 'start stopped → first response', ms: start },
    ];
  } finally {
    await h.close();
    await registry.stop();
  }
}

export function machineDescription(): string {
  const runtime = (cmd: string) => { try { return execFileSync(cmd, ['--version'], { encoding: 'utf8' }).split('\n')[0]; } catch { return 'absent'; } };
  return `${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, ${Math.round(totalmem() / 2 ** 30)} GiB, Linux ${release()}, Node ${process.version}, ${runtime('runc')}, load ${execFileSync('cat', ['/proc/loadavg'], { encoding: 'utf8' }).trim()}`;
}
