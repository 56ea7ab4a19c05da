// `tarmac certs add|list|show|remove` in this process against a real API over a temp SQLite catalog.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { testCert } from '../../test/helpers/certs.ts';
import { writeFile } from 'node:fs/promises';
import { parseCommandLine } from './args.ts';
import { cliAgainstApi, type CliResult } from './testing.ts';

async function setup(t: TestContext): Promise<{ dir: string; run(args: string[]): Promise<CliResult> }> {
  return cliAgainstApi(t, 'web');
}

test('certs commands parse: show and remove are verbs of their own, add needs both PEM files', () => {
  const show = parseCommandLine(['certs', 'show', 'www.example.com', '-a', 'web']);
  assert.ok(show.kind === 'run' && show.command.name === 'certs show');
  const remove = parseCommandLine(['cert', 'remove', 'www.example.com', '-a', 'web']);
  assert.ok(remove.kind === 'run' && remove.command.name === 'certs remove');
  assert.throws(() => parseCommandLine(['certs', 'add', 'www.example.com', '-a', 'web', '--fullchain', 'x.pem']), /--private-key FILE/);
  assert.throws(() => parseCommandLine(['certs', 'list']), /missing --app/);
});

test('tarmac certs add, list, show and remove a certificate; --json gives the API\'s documents, never the key', async (t) => {
  const { dir, run } = await setup(t);
  const c = await testCert(['www.example.com']);
  await writeFile(join(dir, 'fullchain.pem'), c.fullchain);
  await writeFile(join(dir, 'privkey.pem'), c.key);

  const added = await run(['certs', 'add', 'www.example.com', '-a', 'web', '--fullchain', 'fullchain.pem', '--private-key', 'privkey.pem']);
  assert.equal(added.code, 0, added.stderr);
  assert.match(added.stdout, /^Added certificate for www\.example\.com to app web \(valid until \d{4}-/);

  const list = await run(['certs', 'list', '-a', 'web']);
  assert.equal(list.code, 0, list.stderr);
  assert.match(list.stdout, /HOSTNAME\s+SOURCE\s+ISSUER\s+EXPIRES/);
  assert.match(list.stdout, /www\.example\.com\s+custom\s+CN=www\.example\.com\s+in [67]d/);

  const show = await run(['certs', 'show', 'www.example.com', '-a', 'web']);
  assert.match(show.stdout, /SHA-256\s+([0-9A-F]{2}:){31}[0-9A-F]{2}/);

  const json = await run(['certs', 'list', '-a', 'web', '--json']);
  const doc = JSON.parse(json.stdout) as { total_certificates: number };
  assert.equal(doc.total_certificates, 1);
  for (const out of [added.stdout, list.stdout, show.stdout, json.stdout]) assert.ok(!out.includes('PRIVATE KEY'));

  const missing = await run(['certs', 'add', 'www.example.com', '-a', 'web', '--fullchain', 'nope.pem', '--private-key', 'privkey.pem']);
  assert.equal(missing.code, 2);
  assert.match(missing.stderr, /^Error: cannot read --fullchain nope\.pem/);
  const mismatch = await run(['certs', 'add', 'api.example.com', '-a', 'web', '--fullchain', 'fullchain.pem', '--private-key', 'privkey.pem']);
  assert.equal(mismatch.code, 1);
  assert.match(mismatch.stderr, /^Error: hostname: is not covered by the certificate/);

  const removed = await run(['certs', 'remove', 'www.example.com', '-a', 'web']);
  assert.equal(removed.stdout, 'Removed the certificate for www.example.com from app web\n');
  assert.match((await run(['certs', 'list', '-a', 'web'])).stdout, /^No certificates/);
});
