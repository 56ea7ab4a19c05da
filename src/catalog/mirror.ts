// The mirror: a host-local SQLite copy of the etcd catalog, kept current by a watch from its own applied revision.
import type { Duplex } from 'node:stream';
import type Database from 'better-sqlite3';
import type { Etcd3, IEvent, IKeyValue, IWatchRequest, IWatchResponse } from 'etcd3';
import { z } from 'zod';
import type { Logger } from '../shared/log.ts';
import { TarmacError, errorMessage } from '../shared/errors.ts';
import { decodeKey, prefixEnd, type KeyRow } from './keys.ts';
import {
  appSchema, hostSchema, leaseSchema, machineEventSchema, machineSpecSchema, machineStatusSchema, orgSchema, tokenSchema,
} from './schemas.ts';
import { CatalogStore } from './store.ts';
import type {
  ApiToken, App, CatalogChange, ChangeBatch, Host, Lease, MachineEvent, MachineSpec, MachineStatus, Org,
} from './types.ts';

export interface MirrorOptions {
  client: Etcd3;
  /** Key prefix of the catalog, ending in '/'. */
  prefix: string;
  /** The SQLite file of the local copy. */
  path: string;
  log: Logger;
  /** Keys per page when (re)loading the whole catalog. Default 2000. */
  pageSize?: number;
  /** How often the watch stream is asked for progress, as a liveness check. Default 1000 ms. */
  heartbeatMs?: number;
  /** First reconnect delay, doubled up to 2 s. Default 100 ms. */
  retryMs?: number;
}

/** A validated row with its JSON text as read (the schemas have no defaults or transforms, so it is the value). */
type Row = { body: string } & (
  | { table: 'org'; value: Org } | { table: 'token'; value: ApiToken } | { table: 'app'; value: App }
  | { table: 'spec'; value: MachineSpec } | { table: 'status'; value: MachineStatus } | { table: 'event'; value: MachineEvent }
  | { table: 'lease'; value: Lease } | { table: 'host'; value: Host });

/**
 * What a host reports about its copy of the catalog, at `<prefix>host-status/<id>` under the host's registration lease
 * (so it vanishes with the host). Kept beside the rows in table host_status; not a change consumers are told about.
 */
export interface HostMirrorStatus {
  host_id: string;
  /** The etcd revision the host's copy had applied when it reported. */
  revision: number;
  /** Milliseconds since the host's copy had last heard from etcd, when it reported. */
  staleness_ms: number;
  /** When the host reported (ISO time). */
  published_at: string;
}

export const hostMirrorStatusSchema = z.strictObject({
  host_id: z.string().min(1),
  revision: z.number().int().nonnegative(),
  staleness_ms: z.number().nonnegative(),
  published_at: z.string(),
});

/** The etcd key of a host's mirror status. */
export function hostStatusKey(prefix: string, hostId: string): string {
  return `${prefix}host-status/${encodeURIComponent(hostId)}`;
}

/** The host id of a host-status key, or undefined for any other key. */
function hostStatusIdOf(prefix: string, key: string): string | undefined {
  const top = `${prefix}host-status/`;
  if (!key.startsWith(top)) return undefined;
  const rest = key.slice(top.length);
  return rest !== '' && !rest.includes('/') ? decodeURIComponent(rest) : undefined;
}

const schemas = {
  org: orgSchema, token: tokenSchema, app: appSchema, spec: machineSpecSchema, status: machineStatusSchema,
  event: machineEventSchema, lease: leaseSchema, host: hostSchema,
} as const;

interface Waiter { revision: number; resolve(): void; reject(e: Error): void; timer: NodeJS.Timeout }

/** Opens the local copy; an empty one is loaded from etcd first (which then must be reachable). */
export async function openMirror(opts: MirrorOptions): Promise<Mirror> {
  const m = new Mirror(opts);
  try {
    if (m.appliedRevision() === 0) await m.resync();
  } catch (e) {
    await m.close();
    throw new TarmacError('unavailable', `cannot load the catalog from etcd (${errorMessage(e)}); check the etcd endpoints`, { cause: e });
  }
  m.start();
  return m;
}

export class Mirror {
  readonly store: CatalogStore;
  readonly #o: Required<Omit<MirrorOptions, 'client' | 'log' | 'path'>> & MirrorOptions;
  readonly #log: Logger;
  readonly #subscribers = new Set<(batch: ChangeBatch) => void>();
  readonly #waiters = new Set<Waiter>();
  readonly #closing = new AbortController();
  #applied: number;
  #lastContact = 0;
  #connected = false;
  #needResync = false;
  #loop: Promise<void> | undefined;
  #endStream: (() => void) | undefined;
  readonly #statusPut: Database.Statement;
  readonly #statusDelete: Database.Statement;
  readonly #statusAll: Database.Statement;

  constructor(opts: MirrorOptions) {
    this.#o = { pageSize: 2000, heartbeatMs: 1000, retryMs: 100, ...opts };
    this.#log = opts.log;
    this.store = new CatalogStore(opts.path);
    this.store.db.exec('CREATE TABLE IF NOT EXISTS host_status (id TEXT PRIMARY KEY, body TEXT NOT NULL)');
    this.#statusPut = this.store.db.prepare('INSERT OR REPLACE INTO host_status (id, body) VALUES (?, ?)');
    this.#statusDelete = this.store.db.prepare('DELETE FROM host_status WHERE id = ?');
    this.#statusAll = this.store.db.prepare('SELECT body FROM host_status ORDER BY id');
    this.#applied = this.store.revision();
  }

  /** Each registered host's last reported mirror status, from this copy. */
  hostStatuses(): HostMirrorStatus[] {
    return (this.#statusAll.all() as Array<{ body: string }>).map((r) => JSON.parse(r.body) as HostMirrorStatus);
  }

  /** The etcd revision this copy reflects: every change up to it is applied, none after it. */
  appliedRevision(): number {
    return this.#applied;
  }

  /** Resolves once the copy has applied `revision`; fails with 'unavailable' after `timeoutMs`. */
  waitForRevision(revision: number, timeoutMs = 10_000): Promise<void> {
    if (this.#applied >= revision) return Promise.resolve();
    if (this.#closing.signal.aborted) return Promise.reject(new TarmacError('unavailable', 'the catalog is closed'));
    return new Promise((resolve, reject) => {
      const w: Waiter = {
        revision, resolve, reject,
        timer: setTimeout(() => {
          this.#waiters.delete(w);
          reject(new TarmacError('unavailable', `this host's copy of the catalog did not reach revision ${revision} within ${timeoutMs} ms (it is at ${this.#applied}); etcd may be unreachable`));
        }, timeoutMs),
      };
      this.#waiters.add(w);
    });
  }

  /** Milliseconds since the mirror last heard from etcd (Infinity if an existing copy was opened and etcd never answered). */
  staleness(): number {
    return this.#lastContact === 0 ? Number.POSITIVE_INFINITY : Date.now() - this.#lastContact;
  }

  /** True while a watch stream is established. */
  get connected(): boolean {
    return this.#connected;
  }

  subscribe(fn: (batch: ChangeBatch) => void): () => void {
    this.#subscribers.add(fn);
    return () => this.#subscribers.delete(fn);
  }

  start(): void {
    this.#loop ??= this.#run();
  }

  async close(): Promise<void> {
    this.#closing.abort();
    this.#endStream?.();
    await this.#loop;
    for (const w of this.#waiters) {
      clearTimeout(w.timer);
      w.reject(new TarmacError('unavailable', 'the catalog is closed'));
    }
    this.#waiters.clear();
    this.#subscribers.clear();
    this.store.close();
  }

  // ---- the watch loop ----

  async #run(): Promise<void> {
    let delay = this.#o.retryMs;
    const signal = this.#closing.signal;
    while (!signal.aborted) {
      try {
        if (this.#needResync) {
          await this.resync();
          this.#needResync = false;
        }
        const established = await this.#watch();
        if (established) delay = this.#o.retryMs;
      } catch (e) {
        if (!signal.aborted) this.#log.warn({ err: e, revision: this.#applied }, 'catalog mirror lost etcd; retrying');
      }
      if (signal.aborted) break;
      if (this.#needResync) continue;
      await new Promise<void>((r) => {
        const t = setTimeout(r, delay);
        signal.addEventListener('abort', () => { clearTimeout(t); r(); }, { once: true });
      });
      delay = Math.min(delay * 2, 2_000);
    }
  }

  /** One watch stream from the applied revision; resolves when it ends (true if it was established). */
  async #watch(): Promise<boolean> {
    // grpc-js's duplex call: a Node stream with cancel().
    const stream = (await this.#o.client.watchClient.watch()) as unknown as Duplex & { cancel(): void };
    return new Promise<boolean>((resolve) => {
      let established = false;
      let lastResponse = Date.now();
      let done = false;
      const finish = () => {
        if (done) return;
        done = true;
        clearInterval(heartbeat);
        this.#connected = false;
        this.#endStream = undefined;
        stream.removeAllListeners('data');
        stream.removeAllListeners('end');
        stream.removeAllListeners('error');
        stream.on('error', () => {}); // cancel() surfaces as an error event: nothing to report
        stream.cancel();
        resolve(established);
      };
      this.#endStream = finish;
      stream.on('data', (res: IWatchResponse) => {
        lastResponse = Date.now();
        this.#lastContact = lastResponse;
        if (res.canceled) {
          if (Number(res.compact_revision) > 0) {
            this.#log.info({ revision: this.#applied, compacted: Number(res.compact_revision) }, 'catalog mirror fell behind compaction; resyncing');
            this.#needResync = true;
          } else {
            this.#log.warn({ reason: res.cancel_reason }, 'catalog watch canceled by etcd');
          }
          finish();
          return;
        }
        if (res.created) {
          established = true;
          this.#connected = true;
          return;
        }
        if (res.events.length > 0) {
          try {
            this.#apply(res.events);
          } catch (e) {
            // A local failure (disk full, a bug): restart the stream from the last committed revision.
            this.#log.error({ err: e }, 'catalog mirror could not apply a change');
            finish();
          }
        }
        // Otherwise a progress response: contact, nothing to apply. (etcd 3.4 can send one before buffered
        // events, so its header revision is not taken as applied.)
      });
      stream.on('error', (err: Error) => {
        if (!this.#closing.signal.aborted) this.#log.warn({ err: errorMessage(err) }, 'catalog watch stream failed');
        finish();
      });
      stream.on('end', finish);
      const heartbeat = setInterval(() => {
        if (Date.now() - lastResponse > this.#o.heartbeatMs * 5) {
          this.#log.warn('catalog watch stream silent; reconnecting');
          finish();
          return;
        }
        stream.write({ progress_request: {} } satisfies IWatchRequest);
      }, this.#o.heartbeatMs);
      stream.write({
        create_request: { key: Buffer.from(this.#o.prefix), range_end: prefixEnd(this.#o.prefix), start_revision: this.#applied + 1 },
      } satisfies IWatchRequest);
      if (this.#closing.signal.aborted) finish();
    });
  }

  /** Applies one watch response in one transaction with its revision, then tells subscribers, per revision. */
  #apply(events: IEvent[]): void {
    const batches: ChangeBatch[] = [];
    let last = this.#applied;
    this.store.transaction(() => {
      let current: ChangeBatch | undefined;
      for (const ev of events) {
        const revision = Number(ev.kv.mod_revision);
        if (revision <= this.#applied) continue; // seen before a reconnect
        if (current?.revision !== revision) {
          current = { revision, changes: [] };
          batches.push(current);
        }
        const change = this.#applyEvent(ev);
        if (change) current.changes.push(change);
        last = revision;
      }
      if (last > this.#applied) this.store.setMeta('revision', last);
    });
    this.#advance(last, batches);
  }

  #applyEvent(ev: IEvent): CatalogChange | undefined {
    const key = ev.kv.key.toString();
    const isDelete = String(ev.type) === 'Delete' || Number(ev.type) === 1;
    const statusOf = hostStatusIdOf(this.#o.prefix, key);
    if (statusOf !== undefined) {
      if (isDelete) this.#statusDelete.run(statusOf);
      else this.#putHostStatus(statusOf, ev.kv);
      return undefined;
    }
    const where = decodeKey(this.#o.prefix, key);
    if (!where) return undefined;
    const s = this.store;
    if (isDelete) {
      const id = where.id;
      switch (where.table) {
        case 'org': s.deleteOrg(id); return { kind: 'org', op: 'delete', key: id };
        case 'token': s.deleteToken(id); return undefined;
        case 'app': s.deleteApp(id); return { kind: 'app', op: 'delete', key: id };
        case 'spec': s.deleteSpec(id); return { kind: 'machine_spec', op: 'delete', key: id };
        case 'status': s.deleteStatus(id); return { kind: 'machine_status', op: 'delete', key: id };
        case 'event': s.deleteEvent(id); return undefined;
        case 'lease': s.deleteLease(id); return { kind: 'lease', op: 'delete', key: id };
        case 'host': s.deleteHost(id); return { kind: 'host', op: 'delete', key: id };
      }
    }
    const row = this.#parse(where, ev.kv);
    if (!row) return undefined;
    return this.#put(row);
  }

  #put(row: Row): CatalogChange | undefined {
    const s = this.store;
    switch (row.table) {
      case 'org': s.putOrg(row.value, row.body); return { kind: 'org', op: 'put', key: row.value.slug, value: row.value };
      case 'token': s.putToken(row.value, row.body); return undefined;
      case 'app': s.putApp(row.value, row.body); return { kind: 'app', op: 'put', key: row.value.name, value: row.value };
      case 'spec': s.putSpec(row.value, row.body); return { kind: 'machine_spec', op: 'put', key: row.value.id, value: row.value };
      case 'status': s.putStatus(row.value, row.body); return { kind: 'machine_status', op: 'put', key: row.value.id, value: row.value };
      case 'event': return s.insertEvent(row.value, row.body) ? { kind: 'machine_event', op: 'put', key: row.value.id, value: row.value } : undefined;
      case 'lease': s.putLease(row.value, row.body); return { kind: 'lease', op: 'put', key: row.value.machine_id, value: row.value };
      case 'host': s.putHost(row.value, row.body); return { kind: 'host', op: 'put', key: row.value.id, value: row.value };
    }
  }

  /** Stores a host's reported mirror status if it is valid (logged and left out otherwise). */
  #putHostStatus(id: string, kv: IKeyValue): boolean {
    let r: ReturnType<typeof hostMirrorStatusSchema.safeParse> | undefined;
    try {
      r = hostMirrorStatusSchema.safeParse(JSON.parse(kv.value.toString()));
    } catch { /* not JSON: reported below */ }
    if (!r?.success || r.data.host_id !== id) {
      this.#log.error({ key: kv.key.toString() }, 'host status in the catalog is not valid; ignored');
      return false;
    }
    this.#statusPut.run(id, JSON.stringify(r.data));
    return true;
  }

  /** Validates a value read from etcd; an invalid one is logged and left out of the copy. */
  #parse(where: KeyRow, kv: IKeyValue): Row | undefined {
    const body = kv.value.toString();
    let json: unknown;
    try {
      json = JSON.parse(body);
    } catch (e) {
      this.#log.error({ key: kv.key.toString(), err: errorMessage(e) }, 'catalog value is not JSON; ignored');
      return undefined;
    }
    const r = schemas[where.table].safeParse(json);
    if (!r.success) {
      this.#log.error({ key: kv.key.toString(), issues: r.error.issues }, 'catalog value does not match its schema; ignored');
      return undefined;
    }
    return { table: where.table, value: r.data, body } as Row;
  }

  #advance(revision: number, batches: ChangeBatch[]): void {
    this.#applied = revision;
    for (const b of batches) {
      if (b.changes.length === 0) continue;
      for (const fn of this.#subscribers) {
        try {
          fn(b);
        } catch (e) {
          queueMicrotask(() => { throw e; });
        }
      }
    }
    for (const w of this.#waiters) {
      if (w.revision > revision) continue;
      clearTimeout(w.timer);
      this.#waiters.delete(w);
      w.resolve();
    }
  }

  // ---- full reload ----

  /**
   * Loads the whole catalog from a paged range pinned to one revision and replaces the local copy in one
   * transaction, so no reader sees a half-loaded catalog; subscribers get the difference as one batch.
   */
  async resync(): Promise<void> {
    const started = Date.now();
    const end = prefixEnd(this.#o.prefix);
    let from = Buffer.from(this.#o.prefix);
    let pinned: string | undefined;
    const rows: Row[] = [];
    const statuses: Array<{ id: string; kv: IKeyValue }> = [];
    let parseMs = 0;
    const page = (from: Buffer, revision: string | undefined) => this.#o.client.kv.range({
      key: from, range_end: end, limit: this.#o.pageSize, ...(revision !== undefined ? { revision } : {}),
    });
    let pending = page(from, undefined);
    for (;;) {
      const res = await pending;
      pinned ??= res.header.revision;
      const lastKv = res.kvs.at(-1);
      const more = res.more && lastKv !== undefined;
      // Ask for the next page before validating this one, so etcd and validation overlap.
      if (more) {
        from = Buffer.concat([lastKv.key, Buffer.from([0])]);
        pending = page(from, pinned);
        pending.catch(() => {}); // awaited next round; a failure there ends the resync
      }
      const p0 = performance.now();
      for (const kv of res.kvs) {
        const statusOf = hostStatusIdOf(this.#o.prefix, kv.key.toString());
        if (statusOf !== undefined) {
          statuses.push({ id: statusOf, kv });
          continue;
        }
        const where = decodeKey(this.#o.prefix, kv.key.toString());
        const row = where && this.#parse(where, kv);
        if (row) rows.push(row);
      }
      parseMs += performance.now() - p0;
      if (!more) break;
    }
    this.#lastContact = Date.now();
    const fetched = Date.now();
    const revision = Number(pinned);
    const diff = this.#subscribers.size > 0;
    const s = this.store;
    const before = diff
      ? {
        org: s.bodies('orgs'), app: s.bodies('apps'), host: s.bodies('hosts'), spec: s.bodies('machine_specs'),
        status: s.bodies('machine_status'), lease: s.bodies('leases'), event: s.bodies('machine_events'),
      }
      : undefined;
    const changes: CatalogChange[] = [];
    s.transaction(() => {
      s.clearRows();
      s.db.exec('DELETE FROM host_status');
      for (const st of statuses) this.#putHostStatus(st.id, st.kv);
      for (const row of rows) {
        const change = this.#put(row);
        if (!before || !change || row.table === 'token') continue;
        const old = before[row.table];
        const id = change.key;
        const body = old.get(id);
        old.delete(id);
        if (row.table === 'event' ? body === undefined : body !== row.body) changes.push(change);
      }
      s.setMeta('revision', revision);
    });
    if (before) {
      const deletes: Array<[Map<string, string>, CatalogChange['kind']]> = [
        [before.lease, 'lease'], [before.status, 'machine_status'], [before.spec, 'machine_spec'], [before.app, 'app'],
        [before.org, 'org'], [before.host, 'host'],
      ];
      for (const [gone, kind] of deletes) {
        for (const key of gone.keys()) changes.push({ kind, op: 'delete', key } as CatalogChange);
      }
    }
    this.#log.info({ revision, rows: rows.length, ms: Date.now() - started, fetchMs: fetched - started, parseMs: Math.round(parseMs), writeMs: Date.now() - fetched }, 'catalog mirror loaded from etcd');
    this.#advance(Math.max(revision, this.#applied), changes.length > 0 ? [{ revision, changes }] : []);
  }
}
