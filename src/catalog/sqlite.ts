// The embedded catalog: fleet state in one SQLite file (better-sqlite3), the single-host default backend.
import { TarmacError } from '../shared/errors.ts';
import { checkCertificateCas } from './certificates.ts';
import { CatalogStore } from './store.ts';
import type {
  ApiToken, App, Catalog, Certificate, CatalogChange, ChangeBatch, Expect, Host, HostRegistration, IpAssignment, Lease, Machine, MachineEvent,
  MachineFilter, MachineSpec, MachineStatus, Org,
} from './types.ts';

/** Opens (creating if needed) the catalog at `path`; ':memory:' works for throwaway use. */
export function openSqliteCatalog(path: string): Catalog {
  return new SqliteCatalog(new CatalogStore(path));
}

class SqliteCatalog implements Catalog {
  readonly #store: CatalogStore;
  readonly #subscribers = new Set<(batch: ChangeBatch) => void>();
  readonly #hostCounter;
  readonly #setHostCounter;
  #pending: CatalogChange[] = [];

  constructor(store: CatalogStore) {
    this.#store = store;
    this.#hostCounter = store.db.prepare('SELECT next FROM host_counters WHERE host_id = ?');
    this.#setHostCounter = store.db.prepare('INSERT OR REPLACE INTO host_counters (host_id, next) VALUES (?, ?)');
  }

  // ---- reads ----

  revision(): number {
    return this.#store.revision();
  }
  getOrg(slug: string): Org | undefined {
    return this.#store.getOrg(slug);
  }
  listOrgs(): Org[] {
    return this.#store.listOrgs();
  }
  findToken(hash: string): ApiToken | undefined {
    return this.#store.findToken(hash);
  }
  getApp(name: string): App | undefined {
    return this.#store.getApp(name);
  }
  listApps(org_slug?: string): App[] {
    return this.#store.listApps(org_slug);
  }
  getMachine(id: string): Machine | undefined {
    return this.#store.getMachine(id);
  }
  listMachines(filter: MachineFilter = {}): Machine[] {
    return this.#store.listMachines(filter);
  }
  listEvents(machine_id: string, limit = 100): MachineEvent[] {
    return this.#store.listEvents(machine_id, limit);
  }
  getLease(machine_id: string): Lease | undefined {
    return this.#store.getLease(machine_id);
  }
  getHost(id: string): Host | undefined {
    return this.#store.getHost(id);
  }
  listHosts(): Host[] {
    return this.#store.listHosts();
  }
  getCertificate(hostname: string): Certificate | undefined {
    return this.#store.getCertificate(hostname);
  }
  listCertificates(app?: string): Certificate[] {
    return this.#store.listCertificates(app);
  }
  getIpAssignment(ip: string): IpAssignment | undefined {
    return this.#store.getIpAssignment(ip);
  }
  listIpAssignments(app?: string): IpAssignment[] {
    return this.#store.listIpAssignments(app);
  }
  subscribe(fn: (batch: ChangeBatch) => void): () => void {
    this.#subscribers.add(fn);
    return () => this.#subscribers.delete(fn);
  }

  // ---- writes: each one transaction, then one change batch ----

  #write<T>(fn: () => T): T {
    this.#pending = [];
    let revision = 0;
    const result = this.#store.transaction(() => {
      const r = fn();
      revision = this.#store.revision() + 1;
      this.#store.setMeta('revision', revision);
      return r;
    });
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
      this.#store.putOrg(org);
      this.#pending.push({ kind: 'org', op: 'put', key: org.slug, value: org });
    });
  }
  async putToken(token: ApiToken): Promise<void> {
    this.#write(() => this.#store.putToken(token));
  }
  async createApp(app: App): Promise<void> {
    this.#write(() => {
      if (this.#store.getApp(app.name)) throw new TarmacError('name_taken', `app name "${app.name}" is already taken`);
      if (!this.#store.getOrg(app.org_slug)) throw new TarmacError('not_found', `organization "${app.org_slug}" not found`);
      this.#store.putApp(app);
      this.#pending.push({ kind: 'app', op: 'put', key: app.name, value: app });
    });
  }
  async deleteApp(name: string, org?: string): Promise<void> {
    this.#write(() => {
      const held = this.#store.getApp(name);
      if (!held || (org !== undefined && held.org_slug !== org)) throw new TarmacError('app_not_found', `app "${name}" not found`);
      for (const id of this.#store.machineIdsOfApp(name)) this.#deleteMachine(id);
      for (const cert of this.#store.listCertificates(name)) {
        this.#store.deleteCertificate(cert.hostname);
        this.#pending.push({ kind: 'certificate', op: 'delete', key: cert.hostname });
      }
      for (const ip of this.#store.listIpAssignments(name)) {
        this.#store.deleteIpAssignment(ip.ip);
        this.#pending.push({ kind: 'ip', op: 'delete', key: ip.ip });
      }
      this.#store.deleteApp(name);
      this.#pending.push({ kind: 'app', op: 'delete', key: name });
    });
  }
  async createMachine(spec: MachineSpec, events: MachineEvent[]): Promise<void> {
    this.#write(() => {
      if (!this.#store.getApp(spec.app)) throw new TarmacError('app_not_found', `app "${spec.app}" not found`);
      if (this.#store.getSpec(spec.id)) throw new TarmacError('conflict', `machine id ${spec.id} exists`);
      this.#checkName(spec);
      this.#store.putSpec(spec);
      this.#pending.push({ kind: 'machine_spec', op: 'put', key: spec.id, value: spec });
      this.#insertEvents(events);
    });
  }
  async updateMachineSpec(spec: MachineSpec, expectVersion: number, events: MachineEvent[] = []): Promise<void> {
    this.#write(() => {
      const current = this.#store.getSpec(spec.id);
      if (!current) throw new TarmacError('machine_not_found', `machine ${spec.id} not found`);
      if (current.version !== expectVersion) {
        throw new TarmacError('conflict', `machine ${spec.id} changed concurrently (version ${current.version}, expected ${expectVersion}); retry`);
      }
      this.#checkName(spec);
      this.#store.putSpec(spec);
      this.#pending.push({ kind: 'machine_spec', op: 'put', key: spec.id, value: spec });
      this.#insertEvents(events);
    });
  }
  async putMachineStatus(status: MachineStatus, events: MachineEvent[] = []): Promise<void> {
    this.#write(() => {
      if (!this.#store.getSpec(status.id)) return; // the machine was removed meanwhile: nothing to record
      this.#store.putStatus(status);
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
      if (!this.#store.getSpec(lease.machine_id)) throw new TarmacError('machine_not_found', `machine ${lease.machine_id} not found`);
      const current = this.#store.getLease(lease.machine_id);
      const live = current && current.expires_at > Date.now() / 1000 ? current : undefined;
      if ((live?.nonce) !== expectNonce) {
        throw new TarmacError('lease_held', `machine ${lease.machine_id} is leased by someone else${live ? ` until ${new Date(live.expires_at * 1000).toISOString()}` : ''}`);
      }
      this.#store.putLease(lease);
      this.#pending.push({ kind: 'lease', op: 'put', key: lease.machine_id, value: lease });
    });
  }
  async deleteLease(machine_id: string, nonce: string): Promise<void> {
    this.#write(() => {
      const current = this.#store.getLease(machine_id);
      if (!current) throw new TarmacError('not_found', `machine ${machine_id} has no lease`);
      if (current.nonce !== nonce) throw new TarmacError('lease_held', `lease nonce does not match the lease on machine ${machine_id}`);
      this.#store.deleteLease(machine_id);
      this.#pending.push({ kind: 'lease', op: 'delete', key: machine_id });
    });
  }
  async putHost(host: Host): Promise<void> {
    this.#write(() => {
      this.#store.putHost(host);
      this.#pending.push({ kind: 'host', op: 'put', key: host.id, value: host });
    });
  }
  async putCertificate(cert: Certificate, cas?: Expect<Certificate>): Promise<void> {
    this.#write(() => {
      if (!this.#store.getApp(cert.app)) throw new TarmacError('app_not_found', `app "${cert.app}" not found`);
      const held = this.#store.getCertificate(cert.hostname);
      if (held && held.app !== cert.app) throw new TarmacError('name_taken', `host name "${cert.hostname}" already has a certificate in another app`);
      checkCertificateCas(cert.hostname, held, cas);
      this.#store.putCertificate(cert);
      this.#pending.push({ kind: 'certificate', op: 'put', key: cert.hostname, value: cert });
    });
  }
  async deleteCertificate(hostname: string, app?: string): Promise<void> {
    this.#write(() => {
      const held = this.#store.getCertificate(hostname);
      if (!held || (app !== undefined && held.app !== app) || !this.#store.deleteCertificate(hostname)) {
        throw new TarmacError('not_found', `no certificate for host name "${hostname}"`);
      }
      this.#pending.push({ kind: 'certificate', op: 'delete', key: hostname });
    });
  }
  async createIpAssignment(ip: IpAssignment): Promise<void> {
    this.#write(() => {
      if (!this.#store.getApp(ip.app)) throw new TarmacError('app_not_found', `app "${ip.app}" not found`);
      if (this.#store.getIpAssignment(ip.ip)) throw new TarmacError('name_taken', `address ${ip.ip} is already assigned`);
      this.#store.putIpAssignment(ip);
      this.#pending.push({ kind: 'ip', op: 'put', key: ip.ip, value: ip });
    });
  }
  async deleteIpAssignment(ip: string, app?: string): Promise<void> {
    this.#write(() => {
      const held = this.#store.getIpAssignment(ip);
      if (!held || (app !== undefined && held.app !== app) || !this.#store.deleteIpAssignment(ip)) {
        throw new TarmacError('not_found', `address ${ip} is not assigned`);
      }
      this.#pending.push({ kind: 'ip', op: 'delete', key: ip });
    });
  }
  async registerHost(host: Host, _ttlSeconds: number): Promise<HostRegistration> {
    await this.putHost(host);
    return { update: (h) => this.putHost(h), close: async () => {} };
  }
  async allocateMachineNumber(host_id: string): Promise<number> {
    return this.#write(() => {
      const next = (this.#hostCounter.get(host_id) as { next: number } | undefined)?.next ?? 1;
      this.#setHostCounter.run(host_id, next + 1);
      return next;
    });
  }
  async allocateNetworkNumber(): Promise<number> {
    return this.#write(() => {
      const next = this.#store.meta('next_network') ?? 1;
      this.#store.setMeta('next_network', next + 1);
      return next;
    });
  }
  async close(): Promise<void> {
    this.#subscribers.clear();
    this.#store.close();
  }

  #checkName(spec: MachineSpec): void {
    if (spec.desired === 'destroyed') return;
    if (this.#store.nameTaken(spec)) {
      throw new TarmacError('name_taken', `machine name "${spec.name}" is already used in app "${spec.app}"`);
    }
  }
  #insertEvents(events: MachineEvent[]): void {
    for (const e of events) {
      if (this.#store.insertEvent(e)) this.#pending.push({ kind: 'machine_event', op: 'put', key: e.id, value: e });
    }
  }
  #deleteMachine(id: string): void {
    this.#store.deleteSpec(id);
    this.#store.deleteStatus(id);
    this.#store.deleteEvents(id);
    if (this.#store.deleteLease(id)) this.#pending.push({ kind: 'lease', op: 'delete', key: id });
    this.#pending.push({ kind: 'machine_status', op: 'delete', key: id });
    this.#pending.push({ kind: 'machine_spec', op: 'delete', key: id });
  }
}
