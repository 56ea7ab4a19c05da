// Helpers for the CLI's own tests: `tarmac` run in this process with captured output (no terminal, no child process),
// against a real API over a temp SQLite catalog.
import type { TestContext } from 'node:test';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import type { ApiOptions } from '../api/index.ts';
import { adminToken, twoOrgApi } from '../api/testing.ts';
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
 * A real API (see src/api/testing.ts: org `personal` with the admin token, org `acme`) with app `app` in `personal`,
 * all removed after the test; `run` runs the CLI against it as the admin, in a temp working directory `dir`.
 */
export async function cliAgainstApi(t: TestContext, app: string, api: Partial<ApiOptions> = {}): Promise<{ dir: string; run(args: string[]): Promise<CliResult> }> {
  const { catalog, url } = await twoOrgApi(t, api);
  await catalog.createApp({ name: app, org_slug: 'personal', network: 'default', created_at: new Date().toISOString() });
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-cli-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const env = { TARMAC_API_URL: url, TARMAC_API_TOKEN: adminToken };
  return { dir, run: (args) => runCaptured(args, env, dir) };
}
