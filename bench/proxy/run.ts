// `node --import tsx bench/proxy/run.ts`: runs the proxy benchmark and writes bench/results/proxy.md.
import { mkdir, writeFile } from 'node:fs/promises';
import { benchProxy } from './index.ts';

const report = await benchProxy();
await mkdir(new URL('../results/', import.meta.url), { recursive: true });
await writeFile(new URL('../results/proxy.md', import.meta.url), report);
process.stdout.write(report);
