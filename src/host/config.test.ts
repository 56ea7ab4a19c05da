// The host config: the example file parses to the defaults, bad values name their field, packages are checked.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readConfigFile, parseHostConfig } from './config.ts';
import { ensureSystemPackages } from './system.ts';
import { silentLogger } from '../shared/log.ts';
import { TarmacError } from '../shared/errors.ts';

test('config.example.toml parses and equals the defaults', async () => {
  const example = parseHostConfig(await readConfigFile(new URL('../../config.example.toml', import.meta.url).pathname));
  assert.deepEqual(example, parseHostConfig({}));
  assert.equal(example.api.port, 4280);
  assert.equal(example.proxy.http.port, 8080);
  assert.ok(Object.isFrozen(example));
});

test('unknown keys and bad values are rejected, naming every field', () => {
  assert.throws(() => parseHostConfig({ api: { host: 'x', port: 99999 }, nope: 1 }), (e: unknown) =>
    e instanceof TarmacError && e.code === 'invalid_argument' && /api\.port/.test(e.message) && /nope/.test(e.message));
});

test('missing system packages: the error names the one command that installs them', async () => {
  await assert.rejects(ensureSystemPackages(['no-such-runtime-xyz'], { install: false, log: silentLogger() }), (e: unknown) =>
    e instanceof TarmacError && /apt-get install -y runc/.test(e.message));
  await ensureSystemPackages(['runc'], { install: false, log: silentLogger() }); // everything present: no error
});
