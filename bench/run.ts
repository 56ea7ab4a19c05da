// `npm run bench`: runs every benchmark and writes its results with the machine described to bench/results/.
import { writeFile, mkdir } from 'node:fs/promises';
import { benchMachineStart, machineDescription, percentile } from './machine-start.ts';

const started = new Date();
const samples = await benchMachineStart();
const rows = samples.map((s) => `| ${s.name} | ${s.ms.length} | ${percentile(s.ms, 50).toFixed(0)} | ${percentile(s.ms, 95).toFixed(0)} | ${Math.min(...s.ms).toFixed(0)} | ${Math.max(...s.ms).toFixed(0)} |`);
const report = `# Machine start (issue 2)

Run ${started.toISOString()} on: ${machineDescription()}.
Driver runc (conmon monitor, overlayfs root, own netns), image served by a local docker-registry, first
response through Tarmac's proxy. Targets: warm create → serving p50 < 300 ms; start of a stopped machine < 150 ms.

| measurement | runs | p50 ms | p95 ms | min ms | max ms |
|---|---|---|---|---|---|
${rows.join('\n')}
`;
await mkdir(new URL('./results/', import.meta.url), { recursive: true });
await writeFile(new URL('./results/machine-start.md', import.meta.url), report);
process.stdout.write(report);
