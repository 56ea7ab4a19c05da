// Preload for Node benchmark peers (NODE_OPTIONS=--import=this, so cluster workers load it too): on SIGUSR2, collects garbage and writes the process's
// memoryUsage() as JSON to <tmpdir>/tarmac-bench-mem-<pid>.json, so the benchmark can read a Node peer's V8 heap (idle.ts).
// Plain JS: it loads before tsx.
import { renameSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

setFlagsFromString('--expose-gc');
/** V8's gc(), exposed at run time (NODE_OPTIONS may not carry --expose-gc). */
const gc = runInNewContext('gc');

process.on('SIGUSR2', () => {
  gc();
  const file = join(tmpdir(), `tarmac-bench-mem-${process.pid}.json`);
  writeFileSync(`${file}.tmp`, JSON.stringify(process.memoryUsage()));
  renameSync(`${file}.tmp`, file);
});
