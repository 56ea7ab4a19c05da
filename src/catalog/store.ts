// The SQLite read side shared by the embedded backend and the etcd mirror: tables, read queries and row writes.
import Database from 'better-sqlite3';
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import type {
  ApiToken, App, Certificate, Host, IpAssignment, Lease, Machine, MachineEvent, MachineFilter, MachineSpec, MachineStatus, Org,
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
CREATE TABLE IF NOT EXISTS certificates (hostname TEXT PRIMARY KEY, app TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS certificates_app ON certificates (app, hostname);
CREATE TABLE IF NOT EXISTS ips (ip TEXT PRIMARY KEY, app TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ips_app ON ips (app, ip);
`;

/** The row tables a catalog copy holds (meta and counters are the owner's business). */
export const rowTables = ['orgs', 'tokens', 'apps', 'machine_specs', 'machine_status', 'machine_events', 'leases', 'hosts', 'certificates', 'ips'] as const;

type Row = { body: string };
const parse = <T>(row: Row | undefined): T | undefined => (row ? (JSON.parse(row.body) as T) : undefined);

/** One SQLite file of catalog rows. Reads are synchronous; writes happen inside `transaction`. */
export class CatalogStore {
  readonly db: Database.Database;
  readonly #s;

  constructor(path: string) {
    if (path !== ':memory:') mkdirSync(dirname(path), { recursive: true });
    const db = new Database(path);
    this.db = db;
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = NORMAL');
    db.pragma('busy_timeout = 5000');
    db.exec(schema);
    const p = (sql: string) => db.prepare(sql);
    this.#s = {
      meta: p('SELECT value FROM meta WHERE key = ?'),
      setMeta: p('INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value'),
      org: p('SELECT body FROM orgs WHERE slug = ?'),
      orgs: p('SELECT body FROM orgs ORDER BY slug'),
      putOrg: p('INSERT OR REPLACE INTO orgs (slug, body) VALUES (?, ?)'),
      deleteOrg: p('DELETE FROM orgs WHERE slug = ?'),
      token: p('SELECT body FROM tokens WHERE hash = ?'),
      putToken: p('INSERT OR REPLACE INTO tokens (hash, org_slug, body) VALUES (?, ?, ?)'),
      deleteToken: p('DELETE FROM tokens WHERE hash = ?'),
      app: p('SELECT body FROM apps WHERE name = ?'),
      apps: p('SELECT body FROM apps ORDER BY name'),
      appsOfOrg: p('SELECT body FROM apps WHERE org_slug = ? ORDER BY name'),
      putApp: p('INSERT OR REPLACE INTO apps (name, org_slug, body) VALUES (?, ?, ?)'),
      deleteApp: p('DELETE FROM apps WHERE name = ?'),
      spec: p('SELECT body FROM machine_specs WHERE id = ?'),
      specIdsOfApp: p('SELECT id FROM machine_specs WHERE app = ?'),
      specs: p('SELECT s.body AS body, st.body AS status FROM machine_specs s LEFT JOIN machine_status st ON st.id = s.id ORDER BY s.id'),
      specsOfApp: p('SELECT s.body AS body, st.body AS status FROM machine_specs s LEFT JOIN machine_status st ON st.id = s.id WHERE s.app = ? ORDER BY s.id'),
      specsOfHost: p('SELECT s.body AS body, st.body AS status FROM machine_specs s LEFT JOIN machine_status st ON st.id = s.id WHERE s.host_id = ? ORDER BY s.id'),
      liveNameInApp: p(`SELECT s.id FROM machine_specs s
                        WHERE s.app = ? AND s.name = ? AND s.id != ? AND json_extract(s.body, '$.desired') != 'destroyed'`),
      putSpec: p(`INSERT INTO machine_specs (id, app, name, host_id, region, body) VALUES (?, ?, ?, ?, ?, ?)
                  ON CONFLICT(id) DO UPDATE SET app = excluded.app, name = excluded.name, host_id = excluded.host_id, region = excluded.region, body = excluded.body`),
      deleteSpec: p('DELETE FROM machine_specs WHERE id = ?'),
      status: p('SELECT body FROM machine_status WHERE id = ?'),
      putStatus: p('INSERT OR REPLACE INTO machine_status (id, app, state, body) VALUES (?, ?, ?, ?)'),
      deleteStatus: p('DELETE FROM machine_status WHERE id = ?'),
      insertEvent: p('INSERT OR IGNORE INTO machine_events (id, machine_id, body) VALUES (?, ?, ?)'),
      event: p('SELECT 1 FROM machine_events WHERE id = ?'),
      events: p('SELECT body FROM machine_events WHERE machine_id = ? ORDER BY seq DESC LIMIT ?'),
      deleteEvent: p('DELETE FROM machine_events WHERE id = ?'),
      deleteEvents: p('DELETE FROM machine_events WHERE machine_id = ?'),
      lease: p('SELECT body FROM leases WHERE machine_id = ?'),
      putLease: p('INSERT OR REPLACE INTO leases (machine_id, body) VALUES (?, ?)'),
      deleteLease: p('DELETE FROM leases WHERE machine_id = ?'),
      host: p('SELECT body FROM hosts WHERE id = ?'),
      hosts: p('SELECT body FROM hosts ORDER BY id'),
      putHost: p('INSERT OR REPLACE INTO hosts (id, body) VALUES (?, ?)'),
      deleteHost: p('DELETE FROM hosts WHERE id = ?'),
      cert: p('SELECT body FROM certificates WHERE hostname = ?'),
      certs: p('SELECT body FROM certificates ORDER BY hostname'),
      certsOfApp: p('SELECT body FROM certificates WHERE app = ? ORDER BY hostname'),
      putCert: p('INSERT OR REPLACE INTO certificates (hostname, app, body) VALUES (?, ?, ?)'),
      deleteCert: p('DELETE FROM certificates WHERE hostname = ?'),
      ip: p('SELECT body FROM ips WHERE ip = ?'),
      ips: p('SELECT body FROM ips ORDER BY ip'),
      ipsOfApp: p('SELECT body FROM ips WHERE app = ? ORDER BY ip'),
      putIp: p('INSERT OR REPLACE INTO ips (ip, app, body) VALUES (?, ?, ?)'),
      deleteIp: p('DELETE FROM ips WHERE ip = ?'),
    };
  }

  // ---- meta ----

  meta(key: string): number | undefined {
    return (this.#s.meta.get(key) as { value: number } | undefined)?.value;
  }
  setMeta(key: string, value: number): void {
    this.#s.setMeta.run(key, value);
  }
  /** Revision this copy reflects (the embedded backend's own counter, or the etcd revision applied). */
  revision(): number {
    return this.meta('revision') ?? 0;
  }

  // ---- reads ----

  getOrg(slug: string): Org | undefined {
    return parse<Org>(this.#s.org.get(slug) as Row | undefined);
  }
  listOrgs(): Org[] {
    return (this.#s.orgs.all() as Row[]).map((r) => JSON.parse(r.body) as Org);
  }
  findToken(hash: string): ApiToken | undefined {
    return parse<ApiToken>(this.#s.token.get(hash) as Row | undefined);
  }
  getApp(name: string): App | undefined {
    return parse<App>(this.#s.app.get(name) as Row | undefined);
  }
  listApps(org_slug?: string): App[] {
    const rows = (org_slug === undefined ? this.#s.apps.all() : this.#s.appsOfOrg.all(org_slug)) as Row[];
    return rows.map((r) => JSON.parse(r.body) as App);
  }
  getSpec(id: string): MachineSpec | undefined {
    return parse<MachineSpec>(this.#s.spec.get(id) as Row | undefined);
  }
  getMachine(id: string): Machine | undefined {
    const spec = this.getSpec(id);
    if (!spec) return undefined;
    return { spec, status: parse<MachineStatus>(this.#s.status.get(id) as Row | undefined) };
  }
  machineIdsOfApp(app: string): string[] {
    return (this.#s.specIdsOfApp.all(app) as Array<{ id: string }>).map((r) => r.id);
  }
  /** Another live (not desired destroyed) machine of the app using `spec.name`. */
  nameTaken(spec: MachineSpec): boolean {
    return this.#s.liveNameInApp.get(spec.app, spec.name, spec.id) !== undefined;
  }
  listMachines(filter: MachineFilter = {}): Machine[] {
    const rows = (filter.app !== undefined
      ? this.#s.specsOfApp.all(filter.app)
      : filter.host_id !== undefined
        ? this.#s.specsOfHost.all(filter.host_id)
        : this.#s.specs.all()) as Array<{ body: string; status: string | null }>;
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
  hasEvent(id: string): boolean {
    return this.#s.event.get(id) !== undefined;
  }
  listEvents(machine_id: string, limit = 100): MachineEvent[] {
    return (this.#s.events.all(machine_id, limit) as Row[]).map((r) => JSON.parse(r.body) as MachineEvent);
  }
  getLease(machine_id: string): Lease | undefined {
    return parse<Lease>(this.#s.lease.get(machine_id) as Row | undefined);
  }
  getHost(id: string): Host | undefined {
    return parse<Host>(this.#s.host.get(id) as Row | undefined);
  }
  listHosts(): Host[] {
    return (this.#s.hosts.all() as Row[]).map((r) => JSON.parse(r.body) as Host);
  }
  getCertificate(hostname: string): Certificate | undefined {
    return parse<Certificate>(this.#s.cert.get(hostname) as Row | undefined);
  }
  listCertificates(app?: string): Certificate[] {
    const rows = (app === undefined ? this.#s.certs.all() : this.#s.certsOfApp.all(app)) as Row[];
    return rows.map((r) => JSON.parse(r.body) as Certificate);
  }
  getIpAssignment(ip: string): IpAssignment | undefined {
    return parse<IpAssignment>(this.#s.ip.get(ip) as Row | undefined);
  }
  listIpAssignments(app?: string): IpAssignment[] {
    const rows = (app === undefined ? this.#s.ips.all() : this.#s.ipsOfApp.all(app)) as Row[];
    return rows.map((r) => JSON.parse(r.body) as IpAssignment);
  }

  // ---- row writes (callers wrap them in `transaction`); `body` is the row's JSON when the caller has it ----

  transaction<T>(fn: () => T): T {
    return this.db.transaction(fn).immediate();
  }
  putOrg(org: Org, body = JSON.stringify(org)): void {
    this.#s.putOrg.run(org.slug, body);
  }
  deleteOrg(slug: string): boolean {
    return this.#s.deleteOrg.run(slug).changes > 0;
  }
  putToken(token: ApiToken, body = JSON.stringify(token)): void {
    this.#s.putToken.run(token.hash, token.org_slug, body);
  }
  deleteToken(hash: string): boolean {
    return this.#s.deleteToken.run(hash).changes > 0;
  }
  putApp(app: App, body = JSON.stringify(app)): void {
    this.#s.putApp.run(app.name, app.org_slug, body);
  }
  deleteApp(name: string): boolean {
    return this.#s.deleteApp.run(name).changes > 0;
  }
  putSpec(spec: MachineSpec, body = JSON.stringify(spec)): void {
    this.#s.putSpec.run(spec.id, spec.app, spec.name, spec.host_id, spec.region, body);
  }
  deleteSpec(id: string): boolean {
    return this.#s.deleteSpec.run(id).changes > 0;
  }
  putStatus(status: MachineStatus, body = JSON.stringify(status)): void {
    this.#s.putStatus.run(status.id, status.app, status.state, body);
  }
  deleteStatus(id: string): boolean {
    return this.#s.deleteStatus.run(id).changes > 0;
  }
  /** Inserts an event unless one with its id exists; true when inserted. */
  insertEvent(e: MachineEvent, body = JSON.stringify(e)): boolean {
    return this.#s.insertEvent.run(e.id, e.machine_id, body).changes > 0;
  }
  deleteEvent(id: string): boolean {
    return this.#s.deleteEvent.run(id).changes > 0;
  }
  deleteEvents(machine_id: string): void {
    this.#s.deleteEvents.run(machine_id);
  }
  putLease(lease: Lease, body = JSON.stringify(lease)): void {
    this.#s.putLease.run(lease.machine_id, body);
  }
  deleteLease(machine_id: string): boolean {
    return this.#s.deleteLease.run(machine_id).changes > 0;
  }
  putHost(host: Host, body = JSON.stringify(host)): void {
    this.#s.putHost.run(host.id, body);
  }
  deleteHost(id: string): boolean {
    return this.#s.deleteHost.run(id).changes > 0;
  }
  putCertificate(cert: Certificate, body = JSON.stringify(cert)): void {
    this.#s.putCert.run(cert.hostname, cert.app, body);
  }
  deleteCertificate(hostname: string): boolean {
    return this.#s.deleteCert.run(hostname).changes > 0;
  }
  putIpAssignment(ip: IpAssignment, body = JSON.stringify(ip)): void {
    this.#s.putIp.run(ip.ip, ip.app, body);
  }
  deleteIpAssignment(ip: string): boolean {
    return this.#s.deleteIp.run(ip).changes > 0;
  }
  close(): void {
    if (this.db.open) this.db.close();
  }
}

function matchesMetadata(spec: MachineSpec, want: Record<string, string>): boolean {
  const have = spec.config.metadata ?? {};
  for (const [k, v] of Object.entries(want)) if (have[k] !== v) return false;
  return true;
}
