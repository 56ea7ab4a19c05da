// TxnRunner on a real etcd cluster: a transaction whose first outcome was unknown is recognised as applied, never twice.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { Etcd3, type IRequestOp } from 'etcd3';
import { startEtcdCluster, type EtcdCluster } from '../../test/helpers/etcd.ts';
import { TxnRunner } from './etcd-txn.ts';

let cluster: EtcdCluster;
let client: Etcd3;
let runner: TxnRunner;
before(async () => {
  cluster = await startEtcdCluster(3);
  client = new Etcd3({ hosts: cluster.endpoints.map((e) => `http://${e}`) });
  runner = new TxnRunner(client, { callTimeoutMs: 3_000, attemptTimeoutMs: 1_000 });
});
after(async () => {
  client?.close();
  await cluster?.stop();
});

const put = (key: string, value: string): IRequestOp => ({ request_put: { key: Buffer.from(key), value: Buffer.from(value) } });
const del = (key: string): IRequestOp => ({ request_delete_range: { key: Buffer.from(key) } });
const absent = (key: string) => ({ key: Buffer.from(key), target: 'Mod' as const, result: 'Equal' as const, mod_revision: 0 });

test('etcd txn: a create-if-absent repeated after it applied is recognised as applied, by value', async () => {
  const ops = [put('/txn/a', '{"id":"a","nonce":1}'), put('/txn/a-index', '')];
  const first = await runner.run({ compare: [absent('/txn/a')], success: ops });
  assert.equal(first.succeeded, true);
  // What a retry after an unknown outcome sees: its compare fails, because the first attempt did apply.
  const again = await runner.run({ compare: [absent('/txn/a')], success: ops });
  assert.equal(again.succeeded, false);
  const applied = await runner.appliedEarlier(ops);
  assert.ok(applied?.succeeded, 'the earlier attempt is recognised');
  assert.ok(Number(applied.header.revision) >= Number(first.header.revision), 'a revision to wait for that covers it');
  // Someone else's value under the key is not ours.
  assert.equal(await runner.appliedEarlier([put('/txn/a', '{"id":"a","nonce":2}')]), undefined);
  assert.equal((await client.getAll().prefix('/txn/a').keys()).length, 2, 'one copy of each key');
});

test('etcd txn: deletes count as applied when the keys are gone; range deletes alone prove nothing', async () => {
  await client.put('/txn/b').value('x');
  const ops = [del('/txn/b')];
  assert.equal(await runner.appliedEarlier(ops), undefined, 'still there: not applied');
  assert.equal((await runner.run({ compare: [], success: ops })).succeeded, true);
  assert.ok((await runner.appliedEarlier(ops))?.succeeded);
  assert.equal(await runner.appliedEarlier([{ request_delete_range: { key: Buffer.from('/txn/'), range_end: Buffer.from('/txn0') } }]), undefined);
});
