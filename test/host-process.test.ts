// `tarmac host` (what `npm start` runs) as a real process: first start, auth, Ctrl-C, restart, bad input.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, rm, stat, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import { TarmacClient, ApiError } from '../src/client/index.ts';
import { startHostProcess } from './helpers/host-process.ts';

const bin = new URL('../bin/tarmac.mjs', import.meta.url).pathname;

test('tarmac host: first start makes the org and a 0600 admin token, Ctrl-C stops cleanly, a restart keeps the apps', async (t) => {
  const dataDir = await mkdtemp(join(tmpdir(), 'tarmac-proc-'));
  t.after(() => rm(dataDir, { recursive: true, force: true }));
  const h = await startHostProcess(dataDir, { logLevel: 'info' });
  t.after(() => h.kill());
  const tokenFile = join(dataDir, 'admin-token');
  assert.equal((await stat(tokenFile)).mode & 0o777, 0o600);
  const token = (await readFile(tokenFile, 'utf8')).trim();
  const client = new TarmacClient({ baseUrl: h.apiUrl, token });
  await client.createApp({ app_name: 'kept', org_slug: 'personal' });
  const bad = new TarmacClient({ baseUrl: h.apiUrl, token: 'nope' });
  await assert.rejects(bad.listApps(), (e: unknown) => e instanceof ApiError && e.status === 401);
  assert.doesNotMatch(h.stderr(), new RegExp(token), 'the token is never printed');
  assert.equal(await h.stop(), 0);

  const again = await startHostProcess(dataDir);
  t.after(() => again.kill());
  const apps = await new TarmacClient({ baseUrl: again.apiUrl, token }).listApps('personal');
  assert.deepEqual(apps.apps.map((a) => a.name), ['kept']);
  assert.equal(await again.stop(), 0);
});

test('tarmac host: TARMAC_API_TOKEN is the admin token when set', async (t) => {
  const dataDir = await mkdtemp(join(tmpdir(), 'tarmac-proc-'));
  t.after(() => rm(dataDir, { recursive: true, force: true }));
  const h = await startHostProcess(dataDir, { env: { TARMAC_API_TOKEN: 'tm_from_env_0123456789' } });
  t.after(() => h.kill());
  const res = await new TarmacClient({ baseUrl: h.apiUrl, token: 'tm_from_env_0123456789' }).listApps();
  assert.equal(res.total_apps, 0);
  assert.equal(await h.stop(), 0);
});

test('tarmac host: bad flags and config values give one line and a non-zero exit', async () => {
  for (const [args, pattern] of [
    [['host', '--bogus'], /^Error: .*bogus/],
    [['host', '--api-listen', 'nowhere'], /^Error: --api-listen: expected HOST:PORT/],
    [['host', '--region', 'Not A Region'], /^Error: invalid flags: region: /],
    [['host', '--config', '/nonexistent.toml'], /^Error: cannot read config file/],
  ] as const) {
    const child = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    const [code] = (await once(child, 'exit')) as [number];
    assert.notEqual(code, 0, args.join(' '));
    assert.equal(err.trim().split('\n').length, 1, `one line for ${args.join(' ')}: ${err}`);
    assert.match(err, pattern);
  }
});
