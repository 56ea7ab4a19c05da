// Runs the catalog benchmark alone and writes bench/results/catalog.md (`node --import tsx bench/catalog/main.ts`).
import { mkdir, writeFile } from 'node:fs/promises';
import { benchCatalog } from './index.ts';

const report = await benchCatalog();
await mkdir(new URL('../results/', import.meta.url), { recursive: true });
await writeFile(new URL('../results/catalog.md', import.meta.url), report);
process.stdout.write(report);
