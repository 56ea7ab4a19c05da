// A full reload of the catalog into a new copy: pages of one revision, kept as bytes, checked and written as they come.
import { open, rm } from 'node:fs/promises';
import type Database from 'better-sqlite3';
import type { CallOptions, Client, Metadata } from '@grpc/grpc-js';
import type { CallOptionsFactory, Etcd3 } from 'etcd3';
import { prefixEnd } from './keys.ts';
import { putChange, type Row } from './mirror-rows.ts';
import { NewCopy, type NewCopyReport } from './new-copy.ts';
import { encodeRangeRequest, scanRangeResponse } from './range-wire.ts';
import type { CatalogChange } from './types.ts';

/** A new copy loaded from etcd: its file, the revision its rows were read at, when etcd last answered, what was found. */
export interface LoadedCopy extends NewCopyReport { path: string; revision: number; contactedAt: number }

/** etcd3's connection pool (protected in its types): calls on a member, with the client's fault handling. */
interface Pool {
  withConnection<R>(service: 'KV', fn: (c: { client: Client; metadata: Metadata }) => Promise<R>): Promise<R>;
  readonly callOptionsFactory: CallOptionsFactory | undefined;
}

/** One Range call whose response stays in its protobuf bytes (decoding it into objects is most of a page's cost). */
function rangeBytes(etcd: Etcd3, request: Buffer): Promise<Buffer> {
  const pool = (etcd as unknown as { pool: Pool }).pool;
  const f = pool.callOptionsFactory;
  const options: CallOptions = (typeof f === 'function' ? f({ service: 'KV', method: 'range', params: {}, isStream: false }) : f) ?? {};
  return pool.withConnection('KV', ({ client, metadata }) => new Promise<Buffer>((resolve, reject) => {
    client.makeUnaryRequest('/etcdserverpb.KV/Range', (b: Buffer) => b, (b: Buffer) => b, request, metadata, options,
      (err, res) => (err || !res ? reject(err ?? new Error('empty etcd range response')) : resolve(res)));
  }));
}

/**
 * Reads every key under `prefix` in pages of `pageSize` pinned to the revision of the first, checking each page's
 * values and writing their rows into a new copy at `path` while etcd serves the next page; the copy is complete
 * (indexes, meta, host statuses) and synced when this resolves. The caller moves it into place or removes it (it is
 * removed here on failure). Each page is one synchronous step of this thread, so keep pages small enough for that.
 */
export async function loadNewCopy(etcd: Etcd3, prefix: string, pageSize: number, path: string): Promise<LoadedCopy> {
  await rm(path, { force: true });
  const copy = new NewCopy(path, prefix);
  try {
    const end = prefixEnd(prefix);
    let revision = 0;
    let pending = rangeBytes(etcd, encodeRangeRequest(Buffer.from(prefix), end, pageSize, 0));
    for (;;) {
      const bytes = await pending;
      const page = scanRangeResponse(bytes);
      revision ||= page.revision;
      const more = page.more && page.lastKey !== undefined;
      // Ask for the next page before checking this one, so that etcd and this thread work at once.
      if (more) {
        pending = rangeBytes(etcd, encodeRangeRequest(Buffer.concat([page.lastKey!, Buffer.from([0])]), end, pageSize, revision));
        pending.catch(() => {}); // awaited next round; a failure there ends the reload
      }
      copy.addPage(bytes);
      if (!more) break;
    }
    const contactedAt = Date.now();
    const report = copy.finish(revision, contactedAt);
    const file = await open(path, 'r+');
    try {
      await file.sync(); // on disk before it replaces the copy in use
    } finally {
      await file.close();
    }
    return { ...report, path, revision, contactedAt };
  } catch (e) {
    copy.abandon();
    await rm(path, { force: true });
    throw e;
  }
}

/** A row table of a copy: its SQLite table, key column, row kind, and the change kind consumers know it by. */
const tables = [
  // In the order of their etcd keys, so the changes of a reload come as a watch would give them.
  { table: 'apps', key: 'name', row: 'app', kind: 'app' },
  { table: 'certificates', key: 'hostname', row: 'certificate', kind: 'certificate' },
  { table: 'machine_events', key: 'id', row: 'event', kind: 'machine_event' },
  { table: 'hosts', key: 'id', row: 'host', kind: 'host' },
  { table: 'ips', key: 'ip', row: 'ip', kind: 'ip' },
  { table: 'leases', key: 'machine_id', row: 'lease', kind: 'lease' },
  { table: 'machine_specs', key: 'id', row: 'spec', kind: 'machine_spec' },
  { table: 'machine_status', key: 'id', row: 'status', kind: 'machine_status' },
  { table: 'orgs', key: 'slug', row: 'org', kind: 'org' },
] as const;
/** Deletions, dependents first. Events go with their machine and are never reported deleted, tokens never at all. */
const deleteOrder = ['leases', 'machine_status', 'machine_specs', 'apps', 'orgs', 'hosts', 'certificates', 'ips'] as const;

/** The changes from the copy in `db` to the new one attached as `next`: rows added or whose JSON differs, then rows gone. */
export function changesToNewCopy(db: Database.Database): CatalogChange[] {
  const changes: CatalogChange[] = [];
  for (const t of tables) {
    const differs = t.row === 'event' ? `m.${t.key} IS NULL ORDER BY s.seq` : `m.body IS NOT s.body ORDER BY s.${t.key}`;
    const bodies = db.prepare(`SELECT s.body FROM next.${t.table} s LEFT JOIN main.${t.table} m ON m.${t.key} = s.${t.key} WHERE ${differs}`)
      .pluck().all() as string[];
    for (const body of bodies) changes.push(putChange({ table: t.row, value: JSON.parse(body), body } as Row)!);
  }
  for (const name of deleteOrder) {
    const t = tables.find((x) => x.table === name)!;
    const gone = db.prepare(`SELECT m.${t.key} FROM main.${t.table} m WHERE NOT EXISTS (SELECT 1 FROM next.${t.table} s WHERE s.${t.key} = m.${t.key}) ORDER BY m.${t.key}`)
      .pluck().all() as string[];
    for (const key of gone) changes.push({ kind: t.kind, op: 'delete', key } as CatalogChange);
  }
  return changes;
}
