// Helpers for the CLI's own tests: `tarmac` run in this process with captured output (no terminal, no child process),
// against a real API over a temp SQLite catalog.
import type { TestContext } from 'node:test';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { openSqliteCatalog } from '../catalog/index.ts';
import { startApi, type ApiOptions } from '../api/index.ts';
import { silentLogger } from '../shared/log.ts';
import { runCli } from './main.ts';

/** What one run printed and returned. */
export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs the CLI with `args` in this process against the API that `env` names (`TARMAC_API_URL`, `TARMAC_API_TOKEN`),
 * with `cwd` as its working directory; every `node bin/tarmac.mjs` would cost ~0.5 s of CPU.
 */
export async function runCaptured(args: string[], env: Record<string, string>, cwd: string): Promise<CliResult> {
  let stdout = '';
  let stderr = '';
  const sink = (add: (s: string) => void) => new Writable({ write(chunk: Buffer | string, _enc, cb) { add(String(chunk)); cb(); } });
  const code = await runCli(args, {
    stdout: sink((s) => (stdout += s)), stderr: sink((s) => (stderr += s)), stdin: Readable.from([]),
    env: { ...env }, cwd, interrupt: new AbortController().signal,
  });
  return { code, stdout, stderr };
}

/**
 * A real API (admin token `cli-token`) over a temp SQLite catalog with org `personal` and app `app`, all removed after
 * the test; `run` runs the CLI against it in a temp working directory `dir`.
 */
export async function cliAgainstApi(t: TestContext, app: string, api: Partial<ApiOptions> = {}): Promise<{ dir: string; run(args: string[]): Promise<CliResult> }> {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-cli-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const catalog = openSqliteCatalog(join(dir, 'catalog.db'));
  t.after(() => catalog.close());
  const at = new Date().toISOString();
  await catalog.putOrg({ slug: 'personal', name: 'Personal', network_id: 1, created_at: at });
  await catalog.createApp({ name: app, org_slug: 'personal', network: 'default', created_at: at });
  const running = await startApi({ catalog, listen: { host: '127.0.0.1', port: 0 }, log: silentLogger(), region: 'local', adminToken: 'cli-token', ...api });
  t.after(() => running.close());
  const env = { TARMAC_API_URL: running.url, TARMAC_API_TOKEN: 'cli-token' };
  return { dir, run: (args) => runCaptured(args, env, dir) };
}
