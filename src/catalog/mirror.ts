// The mirror: a host-local SQLite copy of the etcd catalog, kept current by a watch from its own applied revision.
import { closeSync, fsyncSync, openSync, renameSync, rmSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { dirname } from 'node:path';
import { channel } from 'node:diagnostics_channel';
import type { Duplex } from 'node:stream';
import type Database from 'better-sqlite3';
import type { Etcd3, IEvent, IWatchRequest, IWatchResponse } from 'etcd3';
import type { Logger } from '../shared/log.ts';
import { TarmacError, errorMessage } from '../shared/errors.ts';
import { decodeKey, prefixEnd } from './keys.ts';
import {
  hostStatusBody, hostStatusIdOf, hostStatusTable, isRow, parseRow, putChange, writeRow, type HostMirrorStatus, type RowProblem,
} from './mirror-rows.ts';
import { loadNewCopy, changesToNewCopy } from './resync.ts';
import { CatalogStore } from './store.ts';
import type { CatalogChange, ChangeBatch } from './types.ts';

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
  /** How long an empty copy waits for etcd before opening fails (an existing copy opens at once). Default 30000 ms. */
  loadTimeoutMs?: number;
}

export { hostMirrorStatusSchema, type HostMirrorStatus } from './mirror-rows.ts';

/** The etcd key of a host's mirror status. */
export function hostStatusKey(prefix: string, hostId: string): string {
  return `${prefix}host-status/${encodeURIComponent(hostId)}`;
}

/** Name of the diagnostics channel carrying one MirrorApplyEvent per watch response a mirror applied. */
export const mirrorApplyChannel = 'tarmac:catalog:mirror:apply';

/** Published on `tarmac:catalog:mirror:apply` after a watch response's changes are committed, before subscribers run. */
export interface MirrorApplyEvent {
  /** The mirror's SQLite file, which tells mirrors apart. */
  path: string;
  events: IEvent[];
  /** performance.now() when the response arrived, and when its transaction had committed. */
  receivedAt: number;
  appliedAt: number;
}
const applyEvents = channel(mirrorApplyChannel);

interface Waiter { revision: number; resolve(): void; reject(e: Error): void; timer: NodeJS.Timeout }

/** The open local copy: its store and the statements of its host_status table. */
interface Copy { store: CatalogStore; statusPut: Database.Statement; statusDelete: Database.Statement; statusAll: Database.Statement }

function openCopy(path: string): Copy {
  const store = new CatalogStore(path);
  store.db.exec(hostStatusTable);
  return {
    store,
    statusPut: store.db.prepare('INSERT OR REPLACE INTO host_status (id, body) VALUES (?, ?)'),
    statusDelete: store.db.prepare('DELETE FROM host_status WHERE id = ?'),
    statusAll: store.db.prepare('SELECT body FROM host_status ORDER BY id'),
  };
}

/** Opens the local copy; an empty one is loaded from etcd first (which then must be reachable). */
export async function openMirror(opts: MirrorOptions): Promise<Mirror> {
  const m = new Mirror(opts);
  // A copy with nothing in it has nothing to serve: wait for etcd a bounded time, then give up with one line.
  const waitMs = opts.loadTimeoutMs ?? 30_000;
  const deadline = Date.now() + waitMs;
  for (let delay = 250; m.appliedRevision() === 0; delay = Math.min(delay * 2, 2_000)) {
    try {
      await m.resync();
    } catch (e) {
      if (Date.now() + delay >= deadline) {
        await m.close();
        throw new TarmacError('unavailable', `cannot load the catalog from etcd, which did not answer within ${Math.round(waitMs / 1000)} s ` +
          `(${briefError(e)}); this host has no copy of the catalog yet, so it needs etcd to start: check that etcd is up and the catalog endpoints`, { cause: e });
      }
      opts.log.warn({ err: briefError(e), retry_ms: delay }, 'etcd unreachable and no local copy of the catalog yet; retrying');
      await new Promise((r) => setTimeout(r, delay));
    }
  }
  m.start();
  return m;
}

/** The first sentence of an error's message (grpc's run on for lines), for one-line messages. */
export function briefError(e: unknown): string {
  return errorMessage(e).split(/\.\s|\n/)[0]!.slice(0, 160);
}

export class Mirror {
  readonly #o: Required<Omit<MirrorOptions, 'client' | 'log' | 'path' | 'loadTimeoutMs'>> & MirrorOptions;
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
  #copy: Copy;
  #resyncing: Promise<void> | undefined;

  constructor(opts: MirrorOptions) {
    this.#o = { pageSize: 2000, heartbeatMs: 1000, retryMs: 100, ...opts };
    this.#log = opts.log;
    // A reload builds a new file and moves it into place, so the copy has to be a file.
    if (opts.path === ':memory:' || opts.path === '') throw new TarmacError('invalid_argument', 'the catalog mirror needs a file path, not an in-memory database');
    this.#copy = openCopy(opts.path);
    this.#applied = this.store.revision();
    this.#lastContact = this.store.meta('contacted_at') ?? 0;
  }

  /** The local copy (replaced by a full reload: do not keep it). */
  get store(): CatalogStore {
    return this.#copy.store;
  }

  /** Each registered host's last reported mirror status, from this copy. */
  hostStatuses(): HostMirrorStatus[] {
    return (this.#copy.statusAll.all() as Array<{ body: string }>).map((r) => JSON.parse(r.body) as HostMirrorStatus);
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

  /** Milliseconds since this copy last heard from etcd, across restarts (Infinity if it never has). */
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
    // Kept so that after a restart without etcd the copy still says how old it is.
    if (this.#lastContact > 0) this.store.setMeta('contacted_at', this.#lastContact);
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
        // Ended before cancelled: etcd3 takes an error on a stream still open for writing for a failure of the member
        // (and closes every client of it, counting a failure towards its circuit breaker).
        stream.end();
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
          const receivedAt = performance.now();
          try {
            this.#apply(res.events);
            if (applyEvents.hasSubscribers) {
              applyEvents.publish({ path: this.#o.path, events: res.events, receivedAt, appliedAt: performance.now() } satisfies MirrorApplyEvent);
            }
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
      this.store.setMeta('contacted_at', this.#lastContact);
    });
    this.#advance(last, batches);
  }

  #applyEvent(ev: IEvent): CatalogChange | undefined {
    const key = ev.kv.key.toString();
    const isDelete = String(ev.type) === 'Delete' || Number(ev.type) === 1;
    const statusOf = hostStatusIdOf(this.#o.prefix, key);
    if (statusOf !== undefined) {
      if (isDelete) this.#copy.statusDelete.run(statusOf);
      else this.#putHostStatus(statusOf, key, ev.kv.value.toString());
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
        case 'certificate': s.deleteCertificate(id); return { kind: 'certificate', op: 'delete', key: id };
        case 'ip': s.deleteIpAssignment(id); return { kind: 'ip', op: 'delete', key: id };
      }
    }
    const row = parseRow(where, ev.kv.value.toString());
    if (!isRow(row)) {
      this.#logProblem(key, row);
      return undefined;
    }
    return writeRow(this.store, row) ? putChange(row) : undefined;
  }

  #logProblem(key: string, p: RowProblem): void {
    this.#log.error({ key, ...p.fields }, p.msg);
  }

  /** Stores a host's reported mirror status if it is valid (logged and left out otherwise). */
  #putHostStatus(id: string, key: string, body: string): void {
    const json = hostStatusBody(id, body);
    if (json === undefined) this.#log.error({ key }, 'host status in the catalog is not valid; ignored');
    else this.#copy.statusPut.run(id, json);
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
   * Loads the whole catalog from a paged range pinned to one revision into a new copy in a new file, every row checked,
   * then moves it into place in one synchronous step, so no reader sees a half-loaded catalog; subscribers get the
   * difference as one batch. A call while one runs joins it.
   */
  resync(): Promise<void> {
    this.#resyncing ??= this.#reload().finally(() => { this.#resyncing = undefined; });
    return this.#resyncing;
  }

  async #reload(): Promise<void> {
    const started = Date.now();
    const path = this.#o.path;
    const next = `${path}.resync`;
    const loaded = await loadNewCopy(this.#o.client, this.#o.prefix, this.#o.pageSize, next);
    const fetched = Date.now();
    let changes: CatalogChange[] = [];
    try {
      if (this.#closing.signal.aborted) throw new TarmacError('unavailable', 'the catalog is closed');
      for (const p of loaded.problems) this.#logProblem(p.key, p);
      if (this.#subscribers.size > 0) changes = this.#changesTo(next);
    } catch (e) {
      await rm(next, { force: true });
      throw e;
    }
    // One synchronous step: readers on this thread (the only ones) see the old copy up to here, the new one after.
    // The old connection is closed first, so that no WAL of the old file is left for the new one to read.
    this.#copy.store.close();
    rmSync(`${path}-wal`, { force: true });
    rmSync(`${path}-shm`, { force: true });
    try {
      renameSync(next, path);
    } finally {
      this.#copy = openCopy(path);
    }
    this.#lastContact = loaded.contactedAt;
    syncDirectory(dirname(path));
    const { revision } = loaded;
    this.#log.info({ revision, rows: loaded.rows, ms: Date.now() - started, loadMs: fetched - started, checkMs: loaded.workMs, swapMs: Date.now() - fetched }, 'catalog mirror loaded from etcd');
    this.#advance(Math.max(revision, this.#applied), changes.length > 0 ? [{ revision, changes }] : []);
  }

  /** The changes from this copy to the new one in file `next`. */
  #changesTo(next: string): CatalogChange[] {
    const db = this.#copy.store.db;
    db.prepare('ATTACH DATABASE ? AS next').run(next);
    try {
      return changesToNewCopy(db);
    } finally {
      db.exec('DETACH DATABASE next');
    }
  }
}

/** Makes a rename in `dir` durable. */
function syncDirectory(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}
