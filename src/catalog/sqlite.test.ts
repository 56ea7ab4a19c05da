// Runs the catalog conformance suite against the embedded SQLite backend, plus its durability.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openSqliteCatalog } from './sqlite.ts';
import { runCatalogConformance, spec } from './catalog.case.ts';

runCatalogConformance('sqlite', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-cat-'));
  return { catalog: openSqliteCatalog(join(dir, 'catalog.sqlite')), cleanup: () => rm(dir, { recursive: true, force: true }) };
});

test('sqlite: state survives reopening the file', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-cat-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'catalog.sqlite');
  const a = openSqliteCatalog(path);
  await a.putOrg({ slug: 'personal', name: 'P', network_id: 1, created_at: '' });
  await a.createApp({ name: 'web', org_slug: 'personal', network: 'default', created_at: '' });
  await a.createMachine(spec('m1', 'web', 'one'), []);
  const rev = a.revision();
  await a.close();
  const b = openSqliteCatalog(path);
  t.after(() => b.close());
  assert.equal(b.getMachine('m1')?.spec.name, 'one');
  assert.equal(b.revision(), rev);
});
