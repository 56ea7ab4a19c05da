#!/usr/bin/env -S node --max-semi-space-size=32
// Entry point of the `tarmac` binary: loads the TypeScript sources through tsx and runs the CLI. The V8 flag sizes the
// young generation for the proxy in the host process (as src/proxy/cluster.ts's proxyWorkerHeapFlags do for workers).
import { register } from 'tsx/esm/api';
register();
const { main } = await import('../src/cli/main.ts');
process.exitCode = await main(process.argv.slice(2));
