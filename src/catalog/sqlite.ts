// The embedded catalog: fleet state in one SQLite file (better-sqlite3), the single-host default backend.
import Database from 'better-sqlite3';
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { TarmacError } from '../shared/errors.ts';
import type {
  ApiToken, App, Catalog, CatalogChange, ChangeBatch, Host, Lease, Machine, MachineEvent, MachineFilter,
  MachineSpec, MachineStatus, Org,
} from './types.ts';

const schema = `
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS orgs (slug TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, org_slug TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS apps (name TEXT PRIMARY KEY, org_slug TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS machine_specs (id TEXT PRIMARY KEY, app TEXT NOT NULL, name TEXT NOT NULL, host_id TEXT NOT NULL, region TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS machine_specs_app ON machine_specs (app, name);
CREATE INDEX IF NOT EXISTS machine_specs_host ON machine_specs (host_id);
CREATE TABLE IF NOT EXISTS machine_status (id TEXT PRIMARY KEY, app TEXT NOT NULL, state TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS machine_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, machine_id TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS machine_events_machine ON machine_events (machine_id, seq);
CREATE TABLE IF NOT EXISTS leases (machine_id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hosts (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS host_counters (host_id TEXT PRIMARY KEY, next INTEGER NOT NULL);
`;

type Row = { body: string };
const parse = <T>(row: Row | undefined): T | undefined => (row ? (JSON.parse(row.body) as T) : undefined);

/** Opens (creating if needed) the catalog at `path`; ':memory:' works for throwaway use. */
export function openSqliteCatalog(path: string): Catalog {
  if (path !== ':memory:') mkdirSync(dirname(path), { recursive: true });
  return new SqliteCatalog(new Database(path));
}

class SqliteCatalog implements Catalog {
  readonly #db: Database.Database;
  readonly #subscribers = new Set<(batch: ChangeBatch) => void>();
  readonly #stmt;
  #pending: CatalogChange[] = [];

  constructor(db: Database.Database) {
    this.#db = db;
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = NORMAL');
    db.pragma('busy_timeout = 5000');
    db.exec(schema);
    const p = (sql: string) => db.prepare(sql);
    this.#stmt = {
      meta: p('SELECT value FROM meta WHERE key = ?'),
      setMeta: p('INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value'),
      org: p('SELECT body FROM orgs WHERE slug = ?'),
      orgs: p('SELECT body FROM orgs ORDER BY slug'),
      putOrg: p('INSERT OR REPLACE INTO orgs (slug, body) VALUES (?, ?)'),
      token: p('SELECT body FROM tokens WHERE hash = ?'),
      putToken: p('INSERT OR REPLACE INTO tokens (hash, org_slug, body) VALUES (?, ?, ?)'),
      app: p('SELECT body FROM apps WHERE name = ?'),
      apps: p('SELECT body FROM apps ORDER BY name'),
      appsOfOrg: p('SELECT body FROM apps WHERE org_slug = ? ORDER BY name'),
      insertApp: p('INSERT INTO apps (name, org_slug, body) VALUES (?, ?, ?)'),
      deleteApp: p('DELETE FROM apps WHERE name = ?'),
      spec: p('SELECT body FROM machine_specs WHERE id = ?'),
      specIdsOfApp: p('SELECT id FROM machine_specs WHERE app = ?'),
      specs: p('SELECT s.body AS body, st.body AS status FROM machine_specs s LEFT JOIN machine_status st ON st.id = s.id ORDER BY s.id'),
      specsOfApp: p('SELECT s.body AS body, st.body AS status FROM machine_specs s LEFT JOIN machine_status st ON st.id = s.id WHERE s.app = ? ORDER BY s.id'),
      specsOfHost: p('SELECT s.body AS body, st.body AS status FROM machine_specs s LEFT JOIN machine_status st ON st.id = s.id WHERE s.host_id = ? ORDER BY s.id'),
      liveNameInApp: p(`SELECT s.id FROM machine_specs s LEFT JOIN machine_status st ON st.id = s.id
                        WHERE s.app = ? AND s.name = ? AND s.id != ? AND json_extract(s.body, '$.desired') != 'destroyed'`),
      insertSpec: p('INSERT INTO machine_specs (id, app, name, host_id, region, body) VALUES (?, ?, ?, ?, ?, ?)'),
      updateSpec: p('UPDATE machine_specs SET name = ?, host_id = ?, region = ?, body = ? WHERE id = ?'),
      deleteSpec: p('DELETE FROM machine_specs WHERE id = ?'),
      status: p('SELECT body FROM machine_status WHERE id = ?'),
      putStatus: p('INSERT OR REPLACE INTO machine_status (id, app, state, body) VALUES (?, ?, ?, ?)'),
      deleteStatus: p('DELETE FROM machine_status WHERE id = ?'),
      insertEvent: p('INSERT OR IGNORE INTO machine_events (id, machine_id, body) VALUES (?, ?, ?)'),
      events: p('SELECT body FROM machine_events WHERE machine_id = ? ORDER BY seq DESC LIMIT ?'),
      deleteEvents: p('DELETE FROM machine_events WHERE machine_id = ?'),
      lease: p('SELECT body FROM leases WHERE machine_id = ?'),
      putLease: p('INSERT OR REPLACE INTO leases (machine_id, body) VALUES (?, ?)'),
      deleteLease: p('DELETE FROM leases WHERE machine_id = ?'),
      host: p('SELECT body FROM hosts WHERE id = ?'),
      hosts: p('SELECT body FROM hosts ORDER BY id'),
      putHost: p('INSERT OR REPLACE INTO hosts (id, body) VALUES (?, ?)'),
      hostCounter: p('SELECT next FROM host_counters WHERE host_id = ?'),
      setHostCounter: p('INSERT OR REPLACE INTO host_counters (host_id, next) VALUES (?, ?)'),
    };
  }

  // ---- reads ----

  revision(): number {
    return (this.#stmt.meta.get('revision') as { value: number } | undefined)?.value ?? 0;
  }
  getOrg(slug: string): Org | undefined {
    return parse<Org>(this.#stmt.org.get(slug) as Row | undefined);
  }
  listOrgs(): Org[] {
    return (this.#stmt.orgs.all() as Row[]).map((r) => JSON.parse(r.body) as Org);
  }
  findToken(hash: string): ApiToken | undefined {
    return parse<ApiToken>(this.#stmt.token.get(hash) as Row | undefined);
  }
  getApp(name: string): App | undefined {
    return parse<App>(this.#stmt.app.get(name) as Row | undefined);
  }
  listApps(org_slug?: string): App[] {
    const rows = (org_slug === undefined ? this.#stmt.apps.all() : this.#stmt.appsOfOrg.all(org_slug)) as Row[];
    return rows.map((r) => JSON.parse(r.body) as App);
  }
  getMachine(id: string): Machine | undefined {
    const spec = parse<MachineSpec>(this.#stmt.spec.get(id) as Row | undefined);
    if (!spec) return undefined;
    return { spec, status: parse<MachineStatus>(this.#stmt.status.get(id) as Row | undefined) };
  }
  listMachines(filter: MachineFilter = {}): Machine[] {
    const rows = (filter.app !== undefined
      ? this.#stmt.specsOfApp.all(filter.app)
      : filter.host_id !== undefined
        ? this.#stmt.specsOfHost.all(filter.host_id)
        : this.#stmt.specs.all()) as Array<{ body: string; status: string | null }>;
    const out: Machine[] = [];
    for (const r of rows) {
      const spec = JSON.parse(r.body) as MachineSpec;
      const status = r.status ? (JSON.parse(r.status) as MachineStatus) : undefined;
      if (filter.host_id !== undefined && spec.host_id !== filter.host_id) continue;
      if (filter.region !== undefined && spec.region !== filter.region) continue;
      if (!filter.include_deleted && (status?.state === 'destroyed' || (spec.desired === 'destroyed' && !status))) continue;
      if (filter.metadata && !matchesMetadata(spec, filter.metadata)) continue;
      out.push({ spec, status });
    }
    return out;
  }
  listEvents(machine_id: string, limit = 100): MachineEvent[] {
    return (this.#stmt.events.all(machine_id, limit) as Row[]).map((r) => JSON.parse(r.body) as MachineEvent);
  }
  getLease(machine_id: string): Lease | undefined {
    return parse<Lease>(this.#stmt.lease.get(machine_id) as Row | undefined);
  }
  getHost(id: string): Host | undefined {
    return parse<Host>(this.#stmt.host.get(id) as Row | undefined);
  }
  listHosts(): Host[] {
    return (this.#stmt.hosts.all() as Row[]).map((r) => JSON.parse(r.body) as Host);
  }
  subscribe(fn: (batch: ChangeBatch) => void): () => void {
    this.#subscribers.add(fn);
    return () => this.#subscribers.delete(fn);
  }

  // ---- writes: each one transaction, then one change batch ----

  #write<T>(fn: () => T): T {
    this.#pending = [];
    let revision = 0;
    const result = this.#db.transaction(() => {
      const r = fn();
      revision = this.revision() + 1;
      this.#stmt.setMeta.run('revision', revision);
      return r;
    }).immediate();
    const batch: ChangeBatch = { revision, changes: this.#pending };
    this.#pending = [];
    if (batch.changes.length > 0) {
      for (const s of this.#subscribers) {
        try {
          s(batch);
        } catch (e) {
          queueMicrotask(() => { throw e; });
        }
      }
    }
    return result;
  }

  async putOrg(org: Org): Promise<void> {
    this.#write(() => {
      this.#stmt.putOrg.run(org.slug, JSON.stringify(org));
      this.#pending.push({ kind: 'org', op: 'put', key: org.slug, value: org });
    });
  }
  async putToken(token: ApiToken): Promise<void> {
    this.#write(() => {
      this.#stmt.putToken.run(token.hash, token.org_slug, JSON.stringify(token));
    });
  }
  async createApp(app: App): Promise<void> {
    this.#write(() => {
      if (this.getApp(app.name)) throw new TarmacError('name_taken', `app name "${app.name}" is already taken`);
      if (!this.getOrg(app.org_slug)) throw new TarmacError('not_found', `organization "${app.org_slug}" not found`);
      this.#stmt.insertApp.run(app.name, app.org_slug, JSON.stringify(app));
      this.#pending.push({ kind: 'app', op: 'put', key: app.name, value: app });
    });
  }
  async deleteApp(name: string): Promise<void> {
    this.#write(() => {
      if (!this.getApp(name)) throw new TarmacError('app_not_found', `app "${name}" not found`);
      for (const { id } of this.#stmt.specIdsOfApp.all(name) as Array<{ id: string }>) this.#deleteMachine(id);
      this.#stmt.deleteApp.run(name);
      this.#pending.push({ kind: 'app', op: 'delete', key: name });
    });
  }
  async createMachine(spec: MachineSpec, events: MachineEvent[]): Promise<void> {
    this.#write(() => {
      if (!this.getApp(spec.app)) throw new TarmacError('app_not_found', `app "${spec.app}" not found`);
      if (this.#stmt.spec.get(spec.id)) throw new TarmacError('conflict', `machine id ${spec.id} exists`);
      this.#checkName(spec);
      this.#stmt.insertSpec.run(spec.id, spec.app, spec.name, spec.host_id, spec.region, JSON.stringify(spec));
      this.#pending.push({ kind: 'machine_spec', op: 'put', key: spec.id, value: spec });
      this.#insertEvents(events);
    });
  }
  async updateMachineSpec(spec: MachineSpec, expectVersion: number, events: MachineEvent[] = []): Promise<void> {
    this.#write(() => {
      const current = parse<MachineSpec>(this.#stmt.spec.get(spec.id) as Row | undefined);
      if (!current) throw new TarmacError('machine_not_found', `machine ${spec.id} not found`);
      if (current.version !== expectVersion) {
        throw new TarmacError('conflict', `machine ${spec.id} changed concurrently (version ${current.version}, expected ${expectVersion}); retry`);
      }
      this.#checkName(spec);
      this.#stmt.updateSpec.run(spec.name, spec.host_id, spec.region, JSON.stringify(spec), spec.id);
      this.#pending.push({ kind: 'machine_spec', op: 'put', key: spec.id, value: spec });
      this.#insertEvents(events);
    });
  }
  async putMachineStatus(status: MachineStatus, events: MachineEvent[] = []): Promise<void> {
    this.#write(() => {
      if (!this.#stmt.spec.get(status.id)) return; // the machine was removed meanwhile: nothing to record
      this.#stmt.putStatus.run(status.id, status.app, status.state, JSON.stringify(status));
      this.#pending.push({ kind: 'machine_status', op: 'put', key: status.id, value: status });
      this.#insertEvents(events);
    });
  }
  async deleteMachine(id: string): Promise<void> {
    this.#write(() => this.#deleteMachine(id));
  }
  async appendEvents(events: MachineEvent[]): Promise<void> {
    this.#write(() => this.#insertEvents(events));
  }
  async putLease(lease: Lease, expectNonce: string | undefined): Promise<void> {
    this.#write(() => {
      if (!this.#stmt.spec.get(lease.machine_id)) throw new TarmacError('machine_not_found', `machine ${lease.machine_id} not found`);
      const current = this.getLease(lease.machine_id);
      const live = current && current.expires_at > Date.now() / 1000 ? current : undefined;
      if ((live?.nonce) !== expectNonce) {
        throw new TarmacError('lease_held', `machine ${lease.machine_id} is leased by someone else${live ? ` until ${new Date(live.expires_at * 1000).toISOString()}` : ''}`);
      }
      this.#stmt.putLease.run(lease.machine_id, JSON.stringify(lease));
      this.#pending.push({ kind: 'lease', op: 'put', key: lease.machine_id, value: lease });
    });
  }
  async deleteLease(machine_id: string, nonce: string): Promise<void> {
    this.#write(() => {
      const current = this.getLease(machine_id);
      if (!current) throw new TarmacError('not_found', `machine ${machine_id} has no lease`);
      if (current.nonce !== nonce) throw new TarmacError('lease_held', `lease nonce does not match the lease on machine ${machine_id}`);
      this.#stmt.deleteLease.run(machine_id);
      this.#pending.push({ kind: 'lease', op: 'delete', key: machine_id });
    });
  }
  async putHost(host: Host): Promise<void> {
    this.#write(() => {
      this.#stmt.putHost.run(host.id, JSON.stringify(host));
      this.#pending.push({ kind: 'host', op: 'put', key: host.id, value: host });
    });
  }
  async allocateMachineNumber(host_id: string): Promise<number> {
    return this.#write(() => {
      const next = (this.#stmt.hostCounter.get(host_id) as { next: number } | undefined)?.next ?? 1;
      this.#stmt.setHostCounter.run(host_id, next + 1);
      return next;
    });
  }
  async allocateNetworkNumber(): Promise<number> {
    return this.#write(() => {
      const next = (this.#stmt.meta.get('next_network') as { value: number } | undefined)?.value ?? 1;
      this.#stmt.setMeta.run('next_network', next + 1);
      return next;
    });
  }
  async close(): Promise<void> {
    this.#subscribers.clear();
    if (this.#db.open) this.#db.close();
  }

  #checkName(spec: MachineSpec): void {
    if (spec.desired === 'destroyed') return;
    if (this.#stmt.liveNameInApp.get(spec.app, spec.name, spec.id)) {
      throw new TarmacError('name_taken', `machine name "${spec.name}" is already used in app "${spec.app}"`);
    }
  }
  #insertEvents(events: MachineEvent[]): void {
    for (const e of events) {
      if (this.#stmt.insertEvent.run(e.id, e.machine_id, JSON.stringify(e)).changes > 0) {
        this.#pending.push({ kind: 'machine_event', op: 'put', key: e.id, value: e });
      }
    }
  }
  #deleteMachine(id: string): void {
    this.#stmt.deleteSpec.run(id);
    this.#stmt.deleteStatus.run(id);
    this.#stmt.deleteEvents.run(id);
    if (this.#stmt.deleteLease.run(id).changes > 0) this.#pending.push({ kind: 'lease', op: 'delete', key: id });
    this.#pending.push({ kind: 'machine_status', op: 'delete', key: id });
    this.#pending.push({ kind: 'machine_spec', op: 'delete', key: id });
  }
}

function matchesMetadata(spec: MachineSpec, want: Record<string, string>): boolean {
  const have = spec.config.metadata ?? {};
  for (const [k, v] of Object.entries(want)) if (have[k] !== v) return false;
  return true;
}
