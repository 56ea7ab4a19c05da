// The routing table: an immutable per-app snapshot of servable backends, kept current from catalog change batches.
import type { CatalogChange, CatalogReader, MachineSpec, MachineStatus } from '../catalog/index.ts';

/** What routing reads from the catalog: a consistent load, then every batch after it. A Catalog is one; so is a cluster worker's feed. */
export type RouteSource = Pick<CatalogReader, 'revision' | 'listApps' | 'listMachines' | 'listHosts' | 'subscribe'>;

/** One place a request for an app can go: a started machine's service on its private address. */
export interface Backend {
  readonly app: string;
  readonly machineId: string;
  readonly instanceId: string;
  /** The machine's private IP (IPv6 or IPv4), no brackets. */
  readonly address: string;
  /** The service's internal_port. */
  readonly port: number;
  readonly region: string;
  /** `http://addr:port` (`http://[addr]:port` for IPv6): the key of the connection pool. */
  readonly origin: string;
  /** The service's `concurrency.type`; both kinds are counted as requests and tunnels in flight (see `inflight`). */
  readonly limitType: 'connections' | 'requests';
  /** Above this many in flight the backend is only used when every other one is above its soft limit too. */
  readonly softLimit: number;
  /** At this many in flight the backend takes no more; requests queue when every backend is there. */
  readonly hardLimit: number;
  /**
   * Requests (and WebSocket tunnels) this proxy has in flight on the backend: the one mutable field. The object
   * survives swaps that leave the machine's service unchanged, so the count does too.
   */
  inflight: number;
}

/** Fly's defaults when a service sets no `concurrency`. */
export const defaultConcurrency = { type: 'connections', soft_limit: 20, hard_limit: 25 } as const;

/** An app's entry in a snapshot. `backends` is empty when the app exists but nothing can serve it. */
export interface AppRoute {
  readonly app: string;
  readonly backends: readonly Backend[];
  /** Round-robin position, kept for callers that rotate; the balancer itself picks by load (Backend.inflight). */
  cursor: number;
}

/** One immutable snapshot. A new object replaces it on every change; requests hold the one they started with. */
export interface RoutingTable {
  /** Increments on each swap (1 is the table built at start). */
  readonly version: number;
  /** Catalog revision the snapshot reflects. */
  readonly revision: number;
  /** Date.now() when the snapshot was built. */
  readonly builtAt: number;
  readonly apps: ReadonlyMap<string, AppRoute>;
}

/** True when a machine should receive traffic: started as asked, current instance, not cordoned. */
export function machineServes(spec: MachineSpec, status: MachineStatus | undefined): boolean {
  return status !== undefined && status.state === 'started' && spec.desired === 'started' && !spec.cordoned
    && status.instance_id === spec.instance_id;
}

/** Backends of a machine: one per tcp service that has a port 80 with the `http` handler. */
export function backendsOf(spec: MachineSpec): Backend[] {
  const out: Backend[] = [];
  for (const service of spec.config.services ?? []) {
    if (service.protocol !== 'tcp') continue;
    const http80 = (service.ports ?? []).some((p) => {
      const covers = p.port === 80 || (p.start_port !== undefined && p.end_port !== undefined && p.start_port <= 80 && p.end_port >= 80);
      return covers && (p.handlers ?? []).includes('http');
    });
    if (!http80) continue;
    const host = spec.private_ip.includes(':') ? `[${spec.private_ip}]` : spec.private_ip;
    const c = service.concurrency;
    const hardLimit = Math.max(1, c?.hard_limit ?? Math.max(defaultConcurrency.hard_limit, c?.soft_limit ?? 0));
    out.push(Object.seal({
      app: spec.app,
      machineId: spec.id,
      instanceId: spec.instance_id,
      address: spec.private_ip,
      port: service.internal_port,
      region: spec.region,
      origin: `http://${host}:${service.internal_port}`,
      limitType: c?.type ?? defaultConcurrency.type,
      softLimit: Math.min(hardLimit, c?.soft_limit ?? Math.min(defaultConcurrency.soft_limit, hardLimit)),
      hardLimit,
      inflight: 0,
    }));
  }
  return out;
}

interface MachineEntry {
  app: string;
  spec: MachineSpec | undefined;
  status: MachineStatus | undefined;
  /** Backends while the machine serves; recomputed only when its spec or status changes, so objects survive swaps. */
  backends: readonly Backend[];
}

/**
 * The proxy's in-memory mirror of what routing needs (apps, machine specs and statuses), fed from change
 * batches. `rebuild()` produces a new snapshot reusing the entries of apps that did not change.
 */
export class RouteIndex {
  readonly #apps = new Set<string>();
  readonly #machines = new Map<string, MachineEntry>();
  readonly #appMachines = new Map<string, Set<string>>();
  readonly #dirty = new Set<string>();
  /** Registered hosts: a machine whose host is gone (its registration lapsed) gets no traffic. */
  readonly #hosts = new Set<string>();
  #revision = 0;
  #table: RoutingTable;

  constructor(catalog: RouteSource) {
    this.#revision = catalog.revision();
    for (const app of catalog.listApps()) this.#apps.add(app.name);
    for (const host of catalog.listHosts()) this.#hosts.add(host.id);
    for (const { spec, status } of catalog.listMachines()) {
      this.#machine(spec.id, spec.app).spec = spec;
      const entry = this.#machines.get(spec.id)!;
      entry.status = status;
      entry.backends = machineServes(spec, status) && this.#hosts.has(spec.host_id) ? backendsOf(spec) : [];
    }
    for (const app of this.#apps) this.#dirty.add(app);
    this.#table = { version: 0, revision: this.#revision, builtAt: Date.now(), apps: new Map() };
    if (!this.rebuild()) this.#table = Object.freeze({ ...this.#table, version: 1 });
  }

  get table(): RoutingTable {
    return this.#table;
  }

  /** Catalog revision already reflected; batches at or below it were read by the initial load. */
  get revision(): number {
    return this.#revision;
  }

  /** Applies one batch; returns true when routing may have changed. */
  apply(revision: number, changes: readonly CatalogChange[]): boolean {
    if (revision <= this.#revision) return false;
    this.#revision = revision;
    let touched = false;
    for (const c of changes) {
      switch (c.kind) {
        case 'app':
          if (c.op === 'put') this.#apps.add(c.key);
          else this.#apps.delete(c.key);
          this.#dirty.add(c.key);
          touched = true;
          break;
        case 'machine_spec': {
          const entry = c.value ? this.#machine(c.key, c.value.app) : this.#machines.get(c.key);
          if (!entry) break;
          entry.spec = c.op === 'put' ? c.value : undefined;
          this.#settle(c.key, entry);
          touched = true;
          break;
        }
        case 'machine_status': {
          const entry = c.value ? this.#machine(c.key, c.value.app) : this.#machines.get(c.key);
          if (!entry) break;
          entry.status = c.op === 'put' ? c.value : undefined;
          this.#settle(c.key, entry);
          touched = true;
          break;
        }
        case 'host': {
          if (c.op === 'put') this.#hosts.add(c.key);
          else this.#hosts.delete(c.key);
          for (const [id, entry] of this.#machines) {
            if (entry.spec?.host_id === c.key) {
              this.#settle(id, entry);
              touched = true;
            }
          }
          break;
        }
        default:
          break;
      }
    }
    return touched;
  }

  /** Builds a new snapshot if anything changed since the last one; returns whether it swapped. */
  rebuild(): boolean {
    if (this.#dirty.size === 0) {
      if (this.#table.revision !== this.#revision) this.#table = { ...this.#table, revision: this.#revision };
      return false;
    }
    const apps = new Map(this.#table.apps);
    for (const app of this.#dirty) {
      if (!this.#apps.has(app)) {
        apps.delete(app);
        continue;
      }
      const backends: Backend[] = [];
      for (const id of this.#appMachines.get(app) ?? []) {
        const entry = this.#machines.get(id);
        if (entry) backends.push(...entry.backends);
      }
      backends.sort((a, b) => (a.machineId < b.machineId ? -1 : a.machineId > b.machineId ? 1 : a.port - b.port));
      const previous = apps.get(app);
      if (previous && sameBackends(previous.backends, backends)) continue;
      apps.set(app, { app, backends: Object.freeze(backends), cursor: previous?.cursor ?? 0 });
    }
    this.#dirty.clear();
    this.#table = Object.freeze({ version: this.#table.version + 1, revision: this.#revision, builtAt: Date.now(), apps });
    return true;
  }

  #machine(id: string, app: string): MachineEntry {
    let entry = this.#machines.get(id);
    if (!entry) {
      entry = { app, spec: undefined, status: undefined, backends: [] };
      this.#machines.set(id, entry);
      let set = this.#appMachines.get(app);
      if (!set) this.#appMachines.set(app, (set = new Set()));
      set.add(id);
    }
    return entry;
  }

  #settle(id: string, entry: MachineEntry): void {
    this.#dirty.add(entry.app);
    if (!entry.spec && !entry.status) {
      this.#machines.delete(id);
      this.#appMachines.get(entry.app)?.delete(id);
      if (this.#appMachines.get(entry.app)?.size === 0) this.#appMachines.delete(entry.app);
      return;
    }
    const serves = entry.spec !== undefined && machineServes(entry.spec, entry.status) && this.#hosts.has(entry.spec.host_id);
    if (!serves) {
      entry.backends = [];
      return;
    }
    const fresh = backendsOf(entry.spec!);
    // Keep the old objects when nothing routing-relevant changed (a status heartbeat, an event).
    if (!sameBackends(entry.backends, fresh)) entry.backends = fresh;
  }
}

function sameBackends(a: readonly Backend[], b: readonly Backend[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!;
    const y = b[i]!;
    if (x !== y && (x.machineId !== y.machineId || x.origin !== y.origin || x.instanceId !== y.instanceId || x.region !== y.region
      || x.softLimit !== y.softLimit || x.hardLimit !== y.hardLimit || x.limitType !== y.limitType)) return false;
  }
  return true;
}
