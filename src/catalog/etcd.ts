// The etcd catalog: fleet state in an etcd cluster, read from a host-local SQLite mirror, written by compare-and-swap.
import { channel } from 'node:diagnostics_channel';
import { ConsecutiveBreaker, circuitBreaker, handleWhen, noop } from 'cockatiel';
import { Etcd3, isRecoverableError, type ICompare, type IRequestOp, type ITxnResponse } from 'etcd3';
import type { Logger } from '../shared/log.ts';
import { TarmacError, errorMessage } from '../shared/errors.ts';
import { checkCertificateCas } from './certificates.ts';
import { KeptLease } from './etcd-lease.ts';
import { TxnRunner } from './etcd-txn.ts';
import { catalogKeys, prefixEnd, type CatalogKeys } from './keys.ts';
import { briefError, hostMirrorStatusSchema, hostStatusKey, openMirror, type HostMirrorStatus, type Mirror } from './mirror.ts';
import { appSchema, certificateSchema, hostSchema, ipAssignmentSchema, leaseSchema, machineSpecSchema } from './schemas.ts';
import type {
  ApiToken, App, Catalog, Certificate, ChangeBatch, Expect, Host, HostRegistration, IpAssignment, Lease, Machine, MachineEvent, MachineFilter,
  MachineSpec, MachineStatus, Org,
} from './types.ts';

export interface EtcdCatalogOptions {
  /** Client URLs or host:port of the etcd members. */
  endpoints: string[];
  /** Key prefix of this fleet's catalog. Default '/tarmac/'. */
  prefix?: string;
  /** The host-local SQLite copy. */
  mirrorPath: string;
  log: Logger;
  /** Time for one etcd call over all its attempts; writes fail with 'unavailable' past it. Default 3000 ms. */
  callTimeoutMs?: number;
  /** Deadline of one attempt of a transaction, after which it is tried on another member (a dead leader). Default 1000 ms. */
  attemptTimeoutMs?: number;
  /** How long a committed write waits for the local copy to apply it. Default 10000 ms. */
  catchUpTimeoutMs?: number;
  /** Watch liveness check interval. Default 1000 ms. */
  heartbeatMs?: number;
  /** Keys per page when loading the whole catalog. Default 2000. */
  pageSize?: number;
  /** How long an empty local copy waits for etcd before opening fails; an existing copy opens at once. Default 30000 ms. */
  loadTimeoutMs?: number;
}

export type { HostMirrorStatus } from './mirror.ts';

/** A host registration on etcd, which can also publish the host's mirror status under the same lease. */
export interface EtcdHostRegistration extends HostRegistration {
  /**
   * Puts this host's mirror status (at `<prefix>host-status/<id>`, under the registration's lease, so it vanishes
   * with the host); kept and put again if the registration has to be renewed. Fails with 'unavailable'.
   */
  publishStatus(status: Omit<HostMirrorStatus, 'host_id'>): Promise<void>;
}

/** The etcd backend's extras beyond the Catalog contract: the mirror's progress and freshness, hosts' mirror statuses. */
export interface EtcdCatalog extends Catalog {
  /** Registers the host; while etcd is unreachable it resolves at once and registers in the background when etcd is back. */
  registerHost(host: Host, ttlSeconds: number): Promise<EtcdHostRegistration>;
  /** Every host's last published mirror status, from the local copy. */
  hostStatuses(): HostMirrorStatus[];
  /** Revision the local copy has applied (same as `revision()`). */
  appliedRevision(): number;
  waitForRevision(revision: number, timeoutMs?: number): Promise<void>;
  /** Milliseconds since the local copy last heard from etcd: what an API puts in a staleness header. */
  staleness(): number;
  /** Reloads the local copy from etcd now (normally done by itself after compaction). */
  resync(): Promise<void>;
}

/** Opens the etcd catalog; an empty mirror is loaded first, an existing one serves reads at once and catches up. */
export async function openEtcdCatalog(opts: EtcdCatalogOptions): Promise<EtcdCatalog> {
  const prefix = opts.prefix ?? '/tarmac/';
  if (!prefix.endsWith('/')) throw new TarmacError('invalid_argument', `the etcd catalog prefix must end in "/" (got "${prefix}")`);
  const callTimeoutMs = opts.callTimeoutMs ?? 3_000;
  const client = new Etcd3({
    hosts: opts.endpoints.map((e) => (e.includes('://') ? e : `http://${e}`)),
    grpcOptions: {
      'grpc.max_receive_message_length': 256 * 1024 * 1024,
      // HTTP/2's default 64 KiB window stalls etcd mid-page while this thread checks the page before (a full reload).
      'grpc-node.flow_control_window': 16 * 1024 * 1024,
      'grpc.initial_reconnect_backoff_ms': 100,
      'grpc.max_reconnect_backoff_ms': 1_000,
    },
    defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + callTimeoutMs }),
    faultHandling: {
      host: () => circuitBreaker(handleWhen(isRecoverableError), { halfOpenAfter: 1_000, breaker: new ConsecutiveBreaker(3) }),
      // No blind retries: a transaction is retried by TxnRunner, which knows when that is safe.
      global: noop,
    },
  });
  let mirror: Mirror;
  try {
    mirror = await openMirror({
      client, prefix, path: opts.mirrorPath, log: opts.log,
      ...(opts.heartbeatMs !== undefined ? { heartbeatMs: opts.heartbeatMs } : {}),
      ...(opts.pageSize !== undefined ? { pageSize: opts.pageSize } : {}),
      ...(opts.loadTimeoutMs !== undefined ? { loadTimeoutMs: opts.loadTimeoutMs } : {}),
    });
  } catch (e) {
    client.close();
    throw e;
  }
  const txns = new TxnRunner(client, { callTimeoutMs, attemptTimeoutMs: opts.attemptTimeoutMs ?? 1_000 });
  return new EtcdBackend(client, txns, mirror, catalogKeys(prefix), opts.log, opts.catchUpTimeoutMs ?? 10_000);
}

const b = (s: string) => Buffer.from(s);
const json = (v: unknown) => Buffer.from(JSON.stringify(v));
const put = (key: string, value: Buffer | string, lease?: string): IRequestOp =>
  ({ request_put: { key: b(key), value: typeof value === 'string' ? b(value) : value, ...(lease ? { lease } : {}) } });
const del = (key: string): IRequestOp => ({ request_delete_range: { key: b(key) } });
const delPrefix = (prefix: string): IRequestOp => ({ request_delete_range: { key: b(prefix), range_end: prefixEnd(prefix) } });
const get = (key: string): IRequestOp => ({ request_range: { key: b(key) } });
const getPrefix = (prefix: string): IRequestOp => ({ request_range: { key: b(prefix), range_end: prefixEnd(prefix), keys_only: true } });
/** The key exists. */
const exists = (key: string): ICompare => ({ key: b(key), target: 'Version', result: 'Greater', version: 0 });
/** The key was last modified at `rev` (0: it does not exist). */
const modIs = (key: string, rev: string | number): ICompare => ({ key: b(key), target: 'Mod', result: 'Equal', mod_revision: rev });
/** Nothing under `prefix` was created or changed after revision `rev`. */
const rangeUnchangedSince = (prefix: string, rev: string): ICompare =>
  ({ key: b(prefix), range_end: prefixEnd(prefix), target: 'Mod', result: 'Less', mod_revision: String(BigInt(rev) + 1n) });

/** Name of the diagnostics channel carrying one EtcdCommitEvent per write transaction etcd answered. */
export const etcdCommitChannel = 'tarmac:catalog:etcd:commit';

/** Published on `tarmac:catalog:etcd:commit` when etcd answers a write, before the local copy has applied it. */
export interface EtcdCommitEvent { ops: IRequestOp[]; succeeded: boolean; revision: number; /** performance.now() */ at: number }
const commitEvents = channel(etcdCommitChannel);

/** Ops per transaction, under etcd's default --max-txn-ops of 128. */
const maxOps = 120;
const casAttempts = 20;

class EtcdBackend implements EtcdCatalog {
  readonly #client: Etcd3;
  readonly #txns: TxnRunner;
  readonly #mirror: Mirror;
  readonly #k: CatalogKeys;
  readonly #log: Logger;
  readonly #catchUpMs: number;
  readonly #registrations = new Set<HostRegistration>();
  #closed = false;

  constructor(client: Etcd3, txns: TxnRunner, mirror: Mirror, keys: CatalogKeys, log: Logger, catchUpMs: number) {
    this.#client = client;
    this.#txns = txns;
    this.#mirror = mirror;
    this.#k = keys;
    this.#log = log;
    this.#catchUpMs = catchUpMs;
  }

  // ---- reads: the local copy ----

  revision(): number { return this.#mirror.appliedRevision(); }
  appliedRevision(): number { return this.#mirror.appliedRevision(); }
  waitForRevision(revision: number, timeoutMs = this.#catchUpMs): Promise<void> { return this.#mirror.waitForRevision(revision, timeoutMs); }
  staleness(): number { return this.#mirror.staleness(); }
  resync(): Promise<void> { return this.#mirror.resync(); }
  hostStatuses(): HostMirrorStatus[] { return this.#mirror.hostStatuses(); }
  getOrg(slug: string): Org | undefined { return this.#mirror.store.getOrg(slug); }
  listOrgs(): Org[] { return this.#mirror.store.listOrgs(); }
  findToken(hash: string): ApiToken | undefined { return this.#mirror.store.findToken(hash); }
  getApp(name: string): App | undefined { return this.#mirror.store.getApp(name); }
  listApps(org_slug?: string): App[] { return this.#mirror.store.listApps(org_slug); }
  getMachine(id: string): Machine | undefined { return this.#mirror.store.getMachine(id); }
  listMachines(filter?: MachineFilter): Machine[] { return this.#mirror.store.listMachines(filter); }
  listEvents(machine_id: string, limit?: number): MachineEvent[] { return this.#mirror.store.listEvents(machine_id, limit); }
  getLease(machine_id: string): Lease | undefined { return this.#mirror.store.getLease(machine_id); }
  getHost(id: string): Host | undefined { return this.#mirror.store.getHost(id); }
  listHosts(): Host[] { return this.#mirror.store.listHosts(); }
  getCertificate(hostname: string): Certificate | undefined { return this.#mirror.store.getCertificate(hostname); }
  listCertificates(app?: string): Certificate[] { return this.#mirror.store.listCertificates(app); }
  getIpAssignment(ip: string): IpAssignment | undefined { return this.#mirror.store.getIpAssignment(ip); }
  listIpAssignments(app?: string): IpAssignment[] { return this.#mirror.store.listIpAssignments(app); }
  subscribe(fn: (batch: ChangeBatch) => void): () => void { return this.#mirror.subscribe(fn); }

  // ---- etcd calls ----

  /** One etcd transaction, failing over between members (see TxnRunner); unreachable etcd becomes 'unavailable'. */
  async #txn(compare: ICompare[], success: IRequestOp[], failure: IRequestOp[] = [], verify = true): Promise<ITxnResponse> {
    if (this.#closed) throw new TarmacError('unavailable', 'the catalog is closed');
    try {
      return await this.#txns.run({ compare, success, failure, verify });
    } catch (e) {
      throw this.#unavailable(e);
    }
  }

  #unavailable(e: unknown): TarmacError {
    if (e instanceof TarmacError) return e;
    const stale = this.#mirror.staleness();
    // grpc's messages run on for lines ("Resolution note: …"): the first sentence is what says why.
    const why = briefError(e);
    return new TarmacError('unavailable',
      `the catalog (etcd) is unreachable, so changes cannot be made now (${why}); reads are served from this host's copy` +
      `${Number.isFinite(stale) ? `, last in touch ${Math.round(stale / 1000)} s ago` : ''}; retry when etcd is back`, { cause: e });
  }

  /** Waits until the local copy has applied a committed transaction that changed something (read-your-writes). */
  async #settle(res: ITxnResponse): Promise<void> {
    const changed = res.responses.some((r) => r.response_put || (r.response_delete_range && r.response_delete_range.deleted !== '0'));
    if (changed) await this.#mirror.waitForRevision(Number(res.header.revision), this.#catchUpMs);
  }

  async #write(ops: IRequestOp[], compare: ICompare[] = []): Promise<ITxnResponse> {
    const res = await this.#txn(compare, ops);
    if (commitEvents.hasSubscribers) commitEvents.publish({ ops, succeeded: res.succeeded, revision: Number(res.header.revision), at: performance.now() } satisfies EtcdCommitEvent);
    if (res.succeeded) await this.#settle(res);
    return res;
  }

  /** Keys of a range response (index keys). */
  static #rangeOf(res: ITxnResponse, i: number) {
    return res.responses[i]?.response_range?.kvs ?? [];
  }

  // ---- writes ----

  async putOrg(org: Org): Promise<void> {
    await this.#write([put(this.#k.org(org.slug), json(org))]);
  }
  async putToken(token: ApiToken): Promise<void> {
    await this.#write([put(this.#k.token(token.hash), json(token))]);
  }

  async createApp(app: App): Promise<void> {
    const k = this.#k;
    const res = await this.#txn(
      [modIs(k.app(app.name), 0), exists(k.org(app.org_slug))],
      [put(k.app(app.name), json(app))],
      [get(k.app(app.name))],
    );
    if (!res.succeeded) {
      if (EtcdBackend.#rangeOf(res, 0).length > 0) throw new TarmacError('name_taken', `app name "${app.name}" is already taken`);
      throw new TarmacError('not_found', `organization "${app.org_slug}" not found`);
    }
    await this.#settle(res);
  }

  async deleteApp(name: string, org?: string): Promise<void> {
    const k = this.#k;
    for (let attempt = 0; attempt < casAttempts; attempt++) {
      const read = await this.#txn([], [get(k.app(name)), getPrefix(k.appMachines(name)), getPrefix(k.appCertificates(name)), getPrefix(k.appIps(name))]);
      const appKv = EtcdBackend.#rangeOf(read, 0)[0];
      if (!appKv) throw new TarmacError('app_not_found', `app "${name}" not found`);
      if (org !== undefined && (this.#parseStored(appSchema, appKv.value, k.app(name)) as App).org_slug !== org) {
        throw new TarmacError('app_not_found', `app "${name}" not found`);
      }
      const ids = EtcdBackend.#rangeOf(read, 1).map((kv) => decodeURIComponent(kv.key.toString().slice(k.appMachines(name).length)));
      const certs = EtcdBackend.#rangeOf(read, 2).map((kv) => decodeURIComponent(kv.key.toString().slice(k.appCertificates(name).length)));
      const ips = EtcdBackend.#rangeOf(read, 3).map((kv) => decodeURIComponent(kv.key.toString().slice(k.appIps(name).length)));
      const compare = [
        modIs(k.app(name), appKv.mod_revision), rangeUnchangedSince(k.appMachines(name), read.header.revision),
        rangeUnchangedSince(k.appCertificates(name), read.header.revision), rangeUnchangedSince(k.appIps(name), read.header.revision),
      ];
      // An app with many machines goes in steps of whole machines; the app row goes last, with the indexes.
      const ops: IRequestOp[] = [];
      let c = 0;
      for (; c < certs.length && ops.length + 2 <= maxOps - 4; c++) ops.push(del(k.certificate(certs[c]!)), del(k.appCertificate(name, certs[c]!)));
      let a = 0;
      for (; a < ips.length && ops.length + 2 <= maxOps - 5; a++) ops.push(del(k.ip(ips[a]!)), del(k.appIp(name, ips[a]!)));
      let i = 0;
      for (; i < ids.length && ops.length + 5 <= maxOps - 4; i++) ops.push(...this.#deleteMachineOps(ids[i]!), del(k.appMachine(name, ids[i]!)));
      const final = i === ids.length && c === certs.length && a === ips.length;
      if (final) ops.push(delPrefix(k.names(name)), delPrefix(k.appMachines(name)), delPrefix(k.appCertificates(name)), delPrefix(k.appIps(name)), del(k.app(name)));
      const res = await this.#txn(compare, ops);
      if (!res.succeeded) continue; // a machine was added or the app changed meanwhile: look again
      await this.#settle(res);
      if (final) return;
      attempt = -1;
    }
    throw new TarmacError('conflict', `app "${name}" kept changing while being deleted; retry`);
  }

  #deleteMachineOps(id: string): IRequestOp[] {
    const k = this.#k;
    return [del(k.lease(id)), del(k.status(id)), del(k.spec(id)), delPrefix(k.events(id))];
  }

  async createMachine(spec: MachineSpec, events: MachineEvent[]): Promise<void> {
    const k = this.#k;
    const live = spec.desired !== 'destroyed';
    const compare = [exists(k.app(spec.app)), modIs(k.spec(spec.id), 0), ...(live ? [modIs(k.name(spec.app, spec.name), 0)] : [])];
    const ops = [
      put(k.spec(spec.id), json(spec)), put(k.appMachine(spec.app, spec.id), ''),
      ...(live ? [put(k.name(spec.app, spec.name), spec.id)] : []),
      ...this.#eventOps(events),
    ];
    const res = await this.#txn(compare, ops, [get(k.app(spec.app)), get(k.spec(spec.id))]);
    if (!res.succeeded) {
      if (EtcdBackend.#rangeOf(res, 0).length === 0) throw new TarmacError('app_not_found', `app "${spec.app}" not found`);
      if (EtcdBackend.#rangeOf(res, 1).length > 0) throw new TarmacError('conflict', `machine id ${spec.id} exists`);
      throw new TarmacError('name_taken', `machine name "${spec.name}" is already used in app "${spec.app}"`);
    }
    await this.#settle(res);
  }

  async updateMachineSpec(spec: MachineSpec, expectVersion: number, events: MachineEvent[] = []): Promise<void> {
    const k = this.#k;
    for (let attempt = 0; attempt < casAttempts; attempt++) {
      const read = await this.#txn([], [get(k.spec(spec.id))]);
      const kv = EtcdBackend.#rangeOf(read, 0)[0];
      if (!kv) throw new TarmacError('machine_not_found', `machine ${spec.id} not found`);
      const current = this.#parseStored(machineSpecSchema, kv.value, k.spec(spec.id)) as MachineSpec;
      if (current.version !== expectVersion) {
        throw new TarmacError('conflict', `machine ${spec.id} changed concurrently (version ${current.version}, expected ${expectVersion}); retry`);
      }
      const oldName = current.desired !== 'destroyed' ? k.name(current.app, current.name) : undefined;
      const newName = spec.desired !== 'destroyed' ? k.name(spec.app, spec.name) : undefined;
      const compare = [modIs(k.spec(spec.id), kv.mod_revision)];
      const ops = [put(k.spec(spec.id), json(spec))];
      if (oldName !== newName) {
        if (oldName) ops.push(del(oldName));
        if (newName) {
          compare.push(modIs(newName, 0));
          ops.push(put(newName, spec.id));
        }
      }
      ops.push(...this.#eventOps(events));
      const res = await this.#txn(compare, ops, [get(k.spec(spec.id))]);
      if (res.succeeded) {
        await this.#settle(res);
        return;
      }
      const now = EtcdBackend.#rangeOf(res, 0)[0];
      if (now && now.mod_revision === kv.mod_revision) {
        throw new TarmacError('name_taken', `machine name "${spec.name}" is already used in app "${spec.app}"`);
      }
    }
    throw new TarmacError('conflict', `machine ${spec.id} kept changing; retry`);
  }

  async putMachineStatus(status: MachineStatus, events: MachineEvent[] = []): Promise<void> {
    // The machine was removed meanwhile: nothing to record (the compare fails, nothing is written).
    await this.#write([put(this.#k.status(status.id), json(status)), ...this.#eventOps(events)], [exists(this.#k.spec(status.id))]);
  }

  async deleteMachine(id: string): Promise<void> {
    const k = this.#k;
    for (let attempt = 0; attempt < casAttempts; attempt++) {
      const read = await this.#txn([], [get(k.spec(id))]);
      const kv = EtcdBackend.#rangeOf(read, 0)[0];
      const ops = this.#deleteMachineOps(id);
      const compare = [modIs(k.spec(id), kv?.mod_revision ?? 0)];
      if (kv) {
        const spec = this.#parseStored(machineSpecSchema, kv.value, k.spec(id)) as MachineSpec;
        ops.push(del(k.appMachine(spec.app, id)));
        // Release the name if the index points at this machine (a destroyed spec already released it).
        const nameKey = k.name(spec.app, spec.name);
        const nameKv = EtcdBackend.#rangeOf(await this.#txn([], [get(nameKey)]), 0)[0];
        compare.push(modIs(nameKey, nameKv?.mod_revision ?? 0));
        if (nameKv?.value.toString() === id) ops.push(del(nameKey));
      }
      const res = await this.#txn(compare, ops);
      if (res.succeeded) return this.#settle(res);
    }
    throw new TarmacError('conflict', `machine ${id} kept changing while being deleted; retry`);
  }

  async appendEvents(events: MachineEvent[]): Promise<void> {
    const fresh = events.filter((e) => !this.#mirror.store.hasEvent(e.id));
    for (let i = 0; i < fresh.length; i += maxOps) await this.#write(this.#eventOps(fresh.slice(i, i + maxOps)));
  }

  /** Events are put as they are; a repeated id rewrites the same value, and the mirror keeps the first. */
  #eventOps(events: MachineEvent[]): IRequestOp[] {
    return events.map((e) => put(this.#k.event(e.machine_id, e.id), json(e)));
  }

  async putLease(lease: Lease, expectNonce: string | undefined): Promise<void> {
    const k = this.#k;
    for (let attempt = 0; attempt < casAttempts; attempt++) {
      const read = await this.#txn([], [get(k.spec(lease.machine_id)), get(k.lease(lease.machine_id))]);
      if (EtcdBackend.#rangeOf(read, 0).length === 0) throw new TarmacError('machine_not_found', `machine ${lease.machine_id} not found`);
      const kv = EtcdBackend.#rangeOf(read, 1)[0];
      const current = kv ? (this.#parseStored(leaseSchema, kv.value, k.lease(lease.machine_id)) as Lease) : undefined;
      const live = current && current.expires_at > Date.now() / 1000 ? current : undefined;
      if (live?.nonce !== expectNonce) {
        throw new TarmacError('lease_held', `machine ${lease.machine_id} is leased by someone else${live ? ` until ${new Date(live.expires_at * 1000).toISOString()}` : ''}`);
      }
      const res = await this.#txn([exists(k.spec(lease.machine_id)), modIs(k.lease(lease.machine_id), kv?.mod_revision ?? 0)], [put(k.lease(lease.machine_id), json(lease))]);
      if (res.succeeded) return this.#settle(res);
    }
    throw new TarmacError('conflict', `the lease on machine ${lease.machine_id} kept changing; retry`);
  }

  async deleteLease(machine_id: string, nonce: string): Promise<void> {
    const k = this.#k;
    for (let attempt = 0; attempt < casAttempts; attempt++) {
      const read = await this.#txn([], [get(k.lease(machine_id))]);
      const kv = EtcdBackend.#rangeOf(read, 0)[0];
      if (!kv) throw new TarmacError('not_found', `machine ${machine_id} has no lease`);
      const current = this.#parseStored(leaseSchema, kv.value, k.lease(machine_id)) as Lease;
      if (current.nonce !== nonce) throw new TarmacError('lease_held', `lease nonce does not match the lease on machine ${machine_id}`);
      const res = await this.#txn([modIs(k.lease(machine_id), kv.mod_revision)], [del(k.lease(machine_id))]);
      if (res.succeeded) return this.#settle(res);
    }
    throw new TarmacError('conflict', `the lease on machine ${machine_id} kept changing; retry`);
  }

  async putHost(host: Host): Promise<void> {
    await this.#write([put(this.#k.host(host.id), json(hostSchema.parse(host)))]);
  }

  async putCertificate(cert: Certificate, cas?: Expect<Certificate>): Promise<void> {
    const k = this.#k;
    const key = k.certificate(cert.hostname);
    for (let attempt = 0; attempt < casAttempts; attempt++) {
      const read = await this.#txn([], [get(key)]);
      const kv = EtcdBackend.#rangeOf(read, 0)[0];
      const held = kv ? (this.#parseStored(certificateSchema, kv.value, key) as Certificate) : undefined;
      if (held && held.app !== cert.app) throw new TarmacError('name_taken', `host name "${cert.hostname}" already has a certificate in another app`);
      checkCertificateCas(cert.hostname, held, cas);
      const res = await this.#txn(
        [exists(k.app(cert.app)), modIs(key, kv?.mod_revision ?? 0)],
        [put(key, json(certificateSchema.parse(cert))), put(k.appCertificate(cert.app, cert.hostname), '')],
        [get(k.app(cert.app))],
      );
      if (res.succeeded) return this.#settle(res);
      if (EtcdBackend.#rangeOf(res, 0).length === 0) throw new TarmacError('app_not_found', `app "${cert.app}" not found`);
    }
    throw new TarmacError('conflict', `the certificate of ${cert.hostname} kept changing; retry`);
  }

  async deleteCertificate(hostname: string, app?: string): Promise<void> {
    const k = this.#k;
    const key = k.certificate(hostname);
    for (let attempt = 0; attempt < casAttempts; attempt++) {
      const kv = EtcdBackend.#rangeOf(await this.#txn([], [get(key)]), 0)[0];
      const held = kv === undefined ? undefined : this.#parseStored(certificateSchema, kv.value, key) as Certificate;
      if (kv === undefined || held === undefined || (app !== undefined && held.app !== app)) {
        throw new TarmacError('not_found', `no certificate for host name "${hostname}"`);
      }
      const res = await this.#txn([modIs(key, kv.mod_revision)], [del(key), del(k.appCertificate(held.app, hostname))]);
      if (res.succeeded) return this.#settle(res);
    }
    throw new TarmacError('conflict', `the certificate of ${hostname} kept changing; retry`);
  }

  async createIpAssignment(ip: IpAssignment): Promise<void> {
    const k = this.#k;
    const res = await this.#txn(
      [exists(k.app(ip.app)), modIs(k.ip(ip.ip), 0)],
      [put(k.ip(ip.ip), json(ipAssignmentSchema.parse(ip))), put(k.appIp(ip.app, ip.ip), '')],
      [get(k.app(ip.app))],
    );
    if (!res.succeeded) {
      if (EtcdBackend.#rangeOf(res, 0).length === 0) throw new TarmacError('app_not_found', `app "${ip.app}" not found`);
      throw new TarmacError('name_taken', `address ${ip.ip} is already assigned`);
    }
    await this.#settle(res);
  }

  async deleteIpAssignment(ip: string, app?: string): Promise<void> {
    const k = this.#k;
    for (let attempt = 0; attempt < casAttempts; attempt++) {
      const kv = EtcdBackend.#rangeOf(await this.#txn([], [get(k.ip(ip))]), 0)[0];
      const held = kv === undefined ? undefined : this.#parseStored(ipAssignmentSchema, kv.value, k.ip(ip)) as IpAssignment;
      if (kv === undefined || held === undefined || (app !== undefined && held.app !== app)) throw new TarmacError('not_found', `address ${ip} is not assigned`);
      const res = await this.#txn([modIs(k.ip(ip), kv.mod_revision)], [del(k.ip(ip)), del(k.appIp(held.app, ip))]);
      if (res.succeeded) return this.#settle(res);
    }
    throw new TarmacError('conflict', `the assignment of ${ip} kept changing; retry`);
  }

  async registerHost(host: Host, ttlSeconds: number): Promise<EtcdHostRegistration> {
    const reg = new HostLease(
      this.#client, this.#k.host(host.id), hostStatusKey(this.#k.prefix, host.id), host, ttlSeconds, this.#log,
      (res) => this.#settle(res), (e) => this.#unavailable(e),
    );
    await reg.registerOrRetry();
    this.#registrations.add(reg);
    const close = reg.close.bind(reg);
    reg.close = async () => {
      this.#registrations.delete(reg);
      await close();
    };
    return reg;
  }

  async allocateMachineNumber(host_id: string): Promise<number> {
    return this.#increment(this.#k.machineCounter(host_id));
  }
  async allocateNetworkNumber(): Promise<number> {
    return this.#increment(this.#k.networkCounter());
  }

  /** Returns the counter's value (1 when absent) and stores value + 1, by compare-and-swap. */
  async #increment(key: string): Promise<number> {
    for (let attempt = 0; attempt < casAttempts * 5; attempt++) {
      const read = await this.#txn([], [get(key)]);
      const kv = EtcdBackend.#rangeOf(read, 0)[0];
      const next = kv ? Number(kv.value.toString()) : 1;
      if (!Number.isSafeInteger(next) || next < 1) throw new Error(`counter ${key} holds "${kv?.value.toString()}", not a positive integer`);
      // Not verified: another writer can put the same number; a failed compare reads again (a number may be skipped).
      const res = await this.#txn([modIs(key, kv?.mod_revision ?? 0)], [put(key, String(next + 1))], [], false);
      if (res.succeeded) {
        await this.#settle(res);
        return next;
      }
    }
    throw new TarmacError('conflict', `counter ${key} is contended; retry`);
  }

  #parseStored(schema: typeof machineSpecSchema | typeof leaseSchema | typeof certificateSchema | typeof ipAssignmentSchema | typeof appSchema, value: Buffer, key: string): unknown {
    let parsed: unknown;
    try {
      parsed = JSON.parse(value.toString());
    } catch (e) {
      throw new Error(`catalog value at ${key} is not JSON`, { cause: e });
    }
    const r = schema.safeParse(parsed);
    if (!r.success) throw new Error(`catalog value at ${key} does not match its schema: ${r.error.message}`);
    return r.data;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    await Promise.allSettled([...this.#registrations].map((r) => r.close()));
    this.#closed = true;
    await this.#mirror.close();
    this.#client.close();
  }
}

/** A host row (and its mirror status) under an etcd lease kept alive in the background; re-registered if the lease is lost. */
class HostLease implements EtcdHostRegistration {
  #lease: KeptLease | undefined;
  #host: Host;
  #status: HostMirrorStatus | undefined;
  #closed = false;
  #retry: NodeJS.Timeout | undefined;

  constructor(
    readonly client: Etcd3,
    readonly key: string,
    readonly statusKey: string,
    host: Host,
    readonly ttlSeconds: number,
    readonly log: Logger,
    readonly settle: (res: ITxnResponse) => Promise<void>,
    readonly unavailable: (e: unknown) => TarmacError,
  ) {
    this.#host = hostSchema.parse(host) as Host;
  }

  /** Registers now; if etcd is unreachable, goes on trying in the background (the host serves from its copy meanwhile). */
  async registerOrRetry(): Promise<void> {
    try {
      await this.register();
    } catch (e) {
      if (!(e instanceof TarmacError) || e.code !== 'unavailable') throw e;
      this.log.warn({ host: this.#host.id, err: briefError(e.cause ?? e) }, 'etcd unreachable; the host registers when it is back');
      this.#scheduleRetry(500);
    }
  }

  async register(): Promise<void> {
    let lease: KeptLease;
    try {
      lease = await KeptLease.grant(this.client, this.ttlSeconds, (err) => {
        if (this.#closed || this.#lease !== lease) return;
        this.log.warn({ err: errorMessage(err), host: this.#host.id }, 'host registration lease lost; registering again');
        this.#scheduleRetry(200);
      });
    } catch (e) {
      throw this.unavailable(e);
    }
    if (this.#closed) { // closed while the grant was on its way: no keepalive may outlive the host
      lease.close();
      return;
    }
    this.#lease?.close();
    this.#lease = lease;
    try {
      await this.#put(lease.id);
    } catch (e) {
      lease.close();
      if (this.#lease === lease) this.#lease = undefined;
      throw this.unavailable(e);
    }
  }

  #scheduleRetry(ms: number): void {
    clearTimeout(this.#retry);
    if (this.#closed) return;
    this.#retry = setTimeout(() => {
      if (this.#closed) return;
      this.#lease?.close();
      this.#lease = undefined;
      this.register().then(
        () => this.log.info({ host: this.#host.id }, 'host registered with etcd'),
        () => this.#scheduleRetry(Math.min(ms * 2, 5_000)),
      );
    }, ms);
    this.#retry.unref(); // a registration waiting for etcd never keeps the process alive by itself
  }

  async #put(leaseId: string): Promise<void> {
    const ops = [put(this.key, json(this.#host), leaseId)];
    if (this.#status) ops.push(put(this.statusKey, json(this.#status), leaseId));
    const res = await this.client.kv.txn({ success: ops });
    await this.settle(res);
  }

  async publishStatus(status: Omit<HostMirrorStatus, 'host_id'>): Promise<void> {
    this.#status = hostMirrorStatusSchema.parse({ ...status, host_id: this.#host.id });
    const lease = this.#lease;
    if (!lease || this.#closed) throw new TarmacError('unavailable', 'the host registration is not active');
    try {
      // Not waited for in the local copy: nothing here reads it back at once.
      await this.client.kv.txn({ success: [put(this.statusKey, json(this.#status), lease.id)] });
    } catch (e) {
      throw this.unavailable(e);
    }
  }

  async update(host: Host): Promise<void> {
    this.#host = hostSchema.parse(host) as Host;
    const lease = this.#lease;
    if (!lease) throw new TarmacError('unavailable', 'the host registration is not active');
    try {
      await this.#put(lease.id);
    } catch (e) {
      throw this.unavailable(e);
    }
  }

  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#retry);
    const lease = this.#lease;
    this.#lease = undefined;
    if (!lease) return;
    // Its keepalive stream and timer stop here, so nothing of the registration keeps the process alive. Revoking deletes
    // the row; if etcd is unreachable the lease simply expires after its TTL.
    lease.close();
    await this.client.leaseClient.leaseRevoke({ ID: lease.id }, { deadline: Date.now() + 3_000 }).catch(() => undefined);
  }
}
