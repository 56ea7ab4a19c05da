// A new local copy of the catalog, built from the raw pages of a full reload: rows checked, no journal until complete.
import type Database from 'better-sqlite3';
import { decodeKey } from './keys.ts';
import { hostStatusBody, hostStatusIdOf, hostStatusTable, isRow, parseRow, writeRow, type RowProblem } from './mirror-rows.ts';
import { forEachKeyValue } from './range-wire.ts';
import { CatalogStore, rowTables } from './store.ts';

/** What building a copy found: rows written, values left out with why (for the mirror to log), time spent. */
export interface NewCopyReport { rows: number; problems: Array<{ key: string } & RowProblem>; workMs: number }

/**
 * A copy being built in a new file at `path` (none may exist there yet): add the pages in key order, then `finish`.
 * Nothing may read the file before `finish` returns: it has no journal, is not synced and has no secondary indexes.
 */
export class NewCopy {
  readonly report: NewCopyReport = { rows: 0, problems: [], workMs: 0 };
  readonly #store: CatalogStore;
  readonly #db: Database.Database;
  readonly #indexes: string[];
  readonly #putStatus: Database.Statement;
  readonly #stage = (key: string, body: string): void => this.#add(key, body);

  constructor(readonly path: string, readonly prefix: string) {
    this.#store = new CatalogStore(path);
    const db = this.#store.db;
    this.#db = db;
    db.pragma('journal_mode = OFF');
    db.pragma('synchronous = OFF');
    // Room for the pages of a large catalog (64 MiB, ~100k machines): the index builds then read the rows from memory.
    db.pragma('cache_size = -65536');
    db.exec(hostStatusTable);
    // Secondary indexes are built once at the end, one sort each, instead of growing row by row.
    const indexes = db.prepare(`SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL AND tbl_name IN (${rowTables.map(() => '?').join(', ')})`)
      .all(...rowTables) as Array<{ name: string; sql: string }>;
    for (const i of indexes) db.exec(`DROP INDEX "${i.name.replaceAll('"', '""')}"`);
    this.#indexes = indexes.map((i) => i.sql);
    this.#putStatus = db.prepare('INSERT OR REPLACE INTO host_status (id, body) VALUES (?, ?)');
    db.exec('BEGIN');
  }

  /** Adds the rows of one RangeResponse (its protobuf bytes). */
  addPage(bytes: Buffer): void {
    const t0 = performance.now();
    forEachKeyValue(bytes, this.#stage);
    this.report.workMs += performance.now() - t0;
  }

  /** Records the copy's revision and last contact, builds the indexes, and closes the file in WAL mode (not synced). */
  finish(revision: number, contactedAt: number): NewCopyReport {
    const t0 = performance.now();
    this.#store.setMeta('revision', revision);
    this.#store.setMeta('contacted_at', contactedAt);
    this.#db.exec('COMMIT');
    for (const sql of this.#indexes) this.#db.exec(sql);
    this.#db.pragma('journal_mode = WAL');
    this.#store.close();
    this.report.workMs = Math.round(this.report.workMs + performance.now() - t0);
    return this.report;
  }

  /** Gives up: closes the file (the caller removes it). */
  abandon(): void {
    this.#store.close();
  }

  #add(key: string, body: string): void {
    const statusOf = hostStatusIdOf(this.prefix, key);
    if (statusOf !== undefined) {
      const json = hostStatusBody(statusOf, body);
      if (json === undefined) this.report.problems.push({ key, msg: 'host status in the catalog is not valid; ignored', fields: {} });
      else this.#putStatus.run(statusOf, json);
      return;
    }
    const where = decodeKey(this.prefix, key);
    if (!where) return;
    const row = parseRow(where, body);
    if (!isRow(row)) {
      this.report.problems.push({ key, ...row });
      return;
    }
    writeRow(this.#store, row);
    this.report.rows++;
  }
}
