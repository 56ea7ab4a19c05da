// `npm run bench`: runs every benchmark and writes its results with the machine described to bench/results/.
// BENCH=machines,proxy,catalog,fleet,dns,mesh picks some; all by default.
import { writeFile, mkdir } from 'node:fs/promises';
import { benchMachineStart, machineDescription, percentile } from './machine-start.ts';
import { benchProxy } from './proxy/index.ts';
import { benchCatalog } from './catalog/index.ts';
import { benchDns } from './dns/index.ts';
import { benchFleet } from './fleet/index.ts';
import { benchMesh } from './mesh/index.ts';

const wanted = new Set((process.env['BENCH'] ?? 'machines,proxy,catalog,fleet,dns,mesh').split(','));
const results = new URL('./results/', import.meta.url);
await mkdir(results, { recursive: true });

async function write(name: string, report: string): Promise<void> {
  await writeFile(new URL(name, results), report);
  process.stdout.write(report + '\n');
}

if (wanted.has('machines')) {
  const started = new Date();
  const samples = await benchMachineStart();
  const rows = samples.map((s) => `| ${s.name} | ${s.ms.length} | ${percentile(s.ms, 50).toFixed(0)} | ${percentile(s.ms, 95).toFixed(0)} | ${Math.min(...s.ms).toFixed(0)} | ${Math.max(...s.ms).toFixed(0)} |`);
  await write('machine-start.md', `# Machine start (issue 2)

Run ${started.toISOString()} on: ${machineDescription()}.
Driver runc (conmon monitor, overlayfs root, own netns), image served by a local docker-registry, first
response through Tarmac's proxy. Targets: warm create → serving p50 < 300 ms; start of a stopped machine < 150 ms.

| measurement | runs | p50 ms | p95 ms | min ms | max ms |
|---|---|---|---|---|---|
${rows.join('\n')}
`);
}
if (wanted.has('proxy')) await write('proxy.md', await benchProxy());
if (wanted.has('catalog')) await write('catalog.md', await benchCatalog());
if (wanted.has('fleet')) await write('fleet.md', await benchFleet());
if (wanted.has('dns')) await write('dns.md', await benchDns());
if (wanted.has('mesh')) await write('mesh.md', await benchMesh());
