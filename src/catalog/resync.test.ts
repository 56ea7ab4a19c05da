// Tests of the mirror's full reload against a real etcd cluster: pages read from raw bytes, rows checked, file swapped.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import Database from 'better-sqlite3';
import { Etcd3 } from 'etcd3';
import { startEtcdCluster, type EtcdCluster } from '../../test/helpers/etcd.ts';
import { waitFor } from '../../test/helpers/wait.ts';
import { createLogger } from '../shared/log.ts';
import { spec } from './catalog.case.ts';
import { openEtcdCatalog } from './etcd.ts';
import type { ChangeBatch } from './types.ts';

let cluster: EtcdCluster;
let etcd: Etcd3;
let dir: string;

before(async () => {
  cluster = await startEtcdCluster(3);
  etcd = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) });
  dir = await mkdtemp(join(tmpdir(), 'tarmac-resync-test-'));
});

after(async () => {
  etcd.close();
  await cluster.stop();
  await rm(dir, { recursive: true, force: true });
});

/** A logger whose lines are kept, parsed. */
function keptLog() {
  const lines: Array<Record<string, unknown>> = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString().split('\n')) if (l !== '') lines.push(JSON.parse(l) as Record<string, unknown>);
      done();
    },
  });
  return { log: createLogger({ level: 'info', destination }), lines };
}

const now = () => new Date().toISOString();

test('a reload over many small pages keeps every valid row exactly, leaves out and logs invalid ones, and leaves no file behind', async () => {
  const prefix = '/reload-pages/';
  await etcd.put(`${prefix}orgs/personal`).value(JSON.stringify({ slug: 'personal', name: 'Ünïcode ✓ 名前', network_id: 1, created_at: now() }));
  await etcd.put(`${prefix}apps/web`).value(JSON.stringify({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() }));
  const specs = new Map(Array.from({ length: 25 }, (_, i) => [`m${i}`, spec(`m${i}`, 'web', `n${i}`)]));
  specs.set('m/x', spec('m/x', 'web', 'nx', { config: { image: 'busybox', env: { GREETING: 'grüß dich 👋' } } }));
  // Among them a name with an encoded character; then a value that is not JSON and one that breaks its schema.
  for (const [id, s] of specs) await etcd.put(`${prefix}machines/${encodeURIComponent(id)}/spec`).value(JSON.stringify(s));
  await etcd.put(`${prefix}machines/bad1/spec`).value('{not json');
  await etcd.put(`${prefix}machines/bad2/spec`).value(JSON.stringify({ ...spec('bad2', 'web', 'nb'), desired: 'flying' }));
  const { log, lines } = keptLog();
  const path = join(dir, 'pages.sqlite');
  const c = await openEtcdCatalog({ endpoints: cluster.endpoints, prefix, mirrorPath: path, log, pageSize: 4 });
  try {
    assert.equal(c.getOrg('personal')?.name, 'Ünïcode ✓ 名前');
    const ids = c.listMachines({ app: 'web' }).map((m) => m.spec.id).sort();
    assert.deepEqual(ids, [...specs.keys()].sort());
    assert.deepEqual(c.getMachine('m/x')?.spec, specs.get('m/x'));
    const rejected = lines.filter((l) => typeof l['key'] === 'string' && (l['key'] as string).includes('/bad')).map((l) => l['key']).sort();
    assert.deepEqual(rejected, [`${prefix}machines/bad1/spec`, `${prefix}machines/bad2/spec`]);
    const loaded = lines.find((l) => l['msg'] === 'catalog mirror loaded from etcd');
    assert.equal(loaded?.['rows'], 28);
    assert.equal(existsSync(`${path}.resync`), false);
  } finally {
    await c.close();
  }
});

test('a reload swaps in the new copy at once: subscribers get the difference, reads before it see the old copy', async () => {
  const prefix = '/reload-swap/';
  await etcd.put(`${prefix}orgs/personal`).value(JSON.stringify({ slug: 'personal', name: 'P', network_id: 1, created_at: now() }));
  await etcd.put(`${prefix}apps/web`).value(JSON.stringify({ name: 'web', org_slug: 'personal', network: 'default', created_at: now() }));
  for (const id of ['a', 'b']) await etcd.put(`${prefix}machines/${id}/spec`).value(JSON.stringify(spec(id, 'web', id)));
  const path = join(dir, 'swap.sqlite');
  const c = await openEtcdCatalog({ endpoints: cluster.endpoints, prefix, mirrorPath: path, log: keptLog().log, pageSize: 2 });
  try {
    const batches: ChangeBatch[] = [];
    c.subscribe((b) => batches.push(b));
    // The copy drifts from etcd (as a missed change would leave it): a row gone, one changed, one extra.
    const other = new Database(path);
    try {
      other.prepare('DELETE FROM machine_specs WHERE id = ?').run('a');
      other.prepare('UPDATE machine_specs SET body = ? WHERE id = ?').run(JSON.stringify(spec('b', 'web', 'b', { version: 9 })), 'b');
      other.prepare('INSERT INTO machine_specs (id, app, name, host_id, region, body) VALUES (?, ?, ?, ?, ?, ?)')
        .run('z', 'web', 'z', 'h1', 'local', JSON.stringify(spec('z', 'web', 'z')));
    } finally {
      other.close();
    }
    const reload = c.resync();
    assert.equal(c.resync(), reload, 'a second call joins the reload running');
    assert.ok(c.getMachine('z'), 'the old copy serves until the swap');
    await reload;
    assert.ok(c.getMachine('a'));
    assert.equal(c.getMachine('b')?.spec.version, 1);
    assert.equal(c.getMachine('z'), undefined);
    const changes = batches.flatMap((b) => b.changes).map((ch) => `${ch.kind} ${ch.op} ${ch.key}`).sort();
    assert.deepEqual(changes, ['machine_spec delete z', 'machine_spec put a', 'machine_spec put b']);
    assert.equal(existsSync(`${path}.resync`), false);
    // The copy swapped in takes watched changes like the old one.
    await etcd.put(`${prefix}machines/d/spec`).value(JSON.stringify(spec('d', 'web', 'd')));
    await waitFor('machine d in the copy', () => c.getMachine('d'), 10_000);
  } finally {
    await c.close();
  }
});
