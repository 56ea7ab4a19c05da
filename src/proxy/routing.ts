// The routing table: an immutable per-app snapshot of servable backends, kept current from catalog change batches.
import type { CatalogChange, CatalogReader, Host, MachineConfig, MachineSpec, MachineStatus } from '../catalog/index.ts';
import { machineStarted, namedChecks } from '../catalog/index.ts';
import { portBackendsOf, samePortBackends, type AppPorts, type PortBackend } from './ports.ts';

/** What routing reads from the catalog: a consistent load, then every batch after it. A Catalog is one; so is a cluster worker's feed. */
export type RouteSource = Pick<CatalogReader, 'revision' | 'listApps' | 'listMachines' | 'listHosts' | 'listCertificates' | 'subscribe'>
  // App addresses (the proxy listens there on non-HTTP ports); a source without them has none.
  & Partial<Pick<CatalogReader, 'listIpAssignments'>>;

/**
 * One place a request for an app can go: a started machine's service on its private address, or, for a machine on
 * another host that takes backhaul, that host's proxy (which delivers to the machine named in Fly-Force-Instance-Id).
 */
export interface Backend {
  readonly app: string;
  readonly machineId: string;
  readonly instanceId: string;
  /** Where to connect: the machine's private IP (IPv6 or IPv4), or its host's backhaul address; no brackets. */
  readonly address: string;
  /** The service's internal_port, or the host's backhaul port. */
  readonly port: number;
  readonly region: string;
  /** `http://addr:port` (`http://[addr]:port` for IPv6): the key of the connection pool. */
  readonly origin: string;
  /** Id of the host whose proxy takes the request over the backhaul; undefined when the proxy connects to the machine itself. */
  readonly via: string | undefined;
  /** Speak h2c (HTTP/2 without TLS) to the machine, or to its host's backhaul: a port of the service sets `http_options.h2_backend`. */
  readonly h2: boolean;
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
  /** Apps with addresses of their own: the addresses and the backends of their non-shared service ports. */
  readonly ports: ReadonlyMap<string, AppPorts>;
}

/** True when a machine should receive traffic: started as asked, current instance, not cordoned, its service checks passing. */
export function machineServes(spec: MachineSpec, status: MachineStatus | undefined): boolean {
  // machineStarted is false without a status.
  return machineStarted(spec, status) && !spec.cordoned && serviceChecksPass(spec, status!);
}

/**
 * True when every `services[].checks` entry that gates traffic (all but `kind: "informational"`) passes in the worker's
 * latest results: a machine whose service has checks gets traffic from its first pass, and none while one fails.
 * Top-level `checks` are informational, as in Fly.
 */
export function serviceChecksPass(spec: MachineSpec, status: MachineStatus): boolean {
  for (const c of namedChecks(spec.config)) {
    if (c.service === undefined || c.check.kind === 'informational') continue;
    if (status.checks?.find((r) => r.name === c.name)?.status !== 'passing') return false;
  }
  return true;
}

/**
 * Backends of a machine: one per tcp service that has a port 80 with the `http` handler. `via` is the machine's host
 * when requests go through that host's proxy (the machine runs elsewhere and its host takes backhaul).
 */
export function backendsOf(spec: MachineSpec, via?: Host): Backend[] {
  const out: Backend[] = [];
  for (const service of spec.config.services ?? []) {
    if (service.protocol !== 'tcp') continue;
    const http80 = (service.ports ?? []).some((p) => {
      const covers = p.port === 80 || (p.start_port !== undefined && p.end_port !== undefined && p.start_port <= 80 && p.end_port >= 80);
      return covers && (p.handlers ?? []).includes('http');
    });
    if (!http80) continue;
    out.push(Object.seal({
      ...serviceTarget(spec, service, via, 'http'),
      h2: (service.ports ?? []).some((p) => p.http_options?.h2_backend === true),
    }));
  }
  return out;
}

type Service = NonNullable<MachineConfig['services']>[number];

/**
 * What every backend of a machine's service has: where to connect (the machine's `internal_port`, or its host's
 * backhaul when `via` takes it), the origin (`scheme://addr:port`), the service's limits, nothing in flight yet.
 */
export function serviceTarget(spec: MachineSpec, service: Service, via: Host | undefined, scheme: string): Omit<Backend, 'h2'> {
  const hop = via?.backhaul === undefined ? undefined : splitHostPort(via.backhaul);
  const address = hop?.host ?? spec.private_ip;
  const port = hop?.port ?? service.internal_port;
  return {
    app: spec.app,
    machineId: spec.id,
    instanceId: spec.instance_id,
    address,
    port,
    region: spec.region,
    origin: `${scheme}://${address.includes(':') ? `[${address}]` : address}:${port}`,
    via: hop === undefined ? undefined : via!.id,
    ...concurrencyOf(service.concurrency),
    inflight: 0,
  };
}

/** A service's concurrency limits with Fly's defaults filled in. */
function concurrencyOf(c: Service['concurrency']): Pick<Backend, 'limitType' | 'softLimit' | 'hardLimit'> {
  const hardLimit = Math.max(1, c?.hard_limit ?? Math.max(defaultConcurrency.hard_limit, c?.soft_limit ?? 0));
  return {
    limitType: c?.type ?? defaultConcurrency.type,
    softLimit: Math.min(hardLimit, c?.soft_limit ?? Math.min(defaultConcurrency.soft_limit, hardLimit)),
    hardLimit,
  };
}

/** Splits `host:port` or `[v6]:port`; undefined when it is neither. */
export function splitHostPort(value: string): { host: string; port: number } | undefined {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]+)):(\d{1,5})$/.exec(value);
  if (m === null) return undefined;
  const port = Number(m[3]);
  return port > 0 && port < 65536 ? { host: m[1] ?? m[2]!, port } : undefined;
}

interface MachineEntry {
  app: string;
  spec: MachineSpec | undefined;
  status: MachineStatus | undefined;
  /** Backends while the machine serves; recomputed only when its spec or status changes, so objects survive swaps. */
  backends: readonly Backend[];
  /** The same for its ports on the app's own addresses. */
  ports: readonly PortBackend[];
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
  readonly #hosts = new Map<string, Host>();
  /** This proxy's host: machines elsewhere are reached through their host's backhaul when it has one. */
  readonly #localHost: string | undefined;
  /** App addresses: app → its addresses, and address → app (a delete change names only the address). */
  readonly #appIps = new Map<string, Set<string>>();
  readonly #ipApp = new Map<string, string>();
  #revision = 0;
  #table: RoutingTable;

  constructor(catalog: RouteSource, localHost?: string) {
    this.#localHost = localHost;
    this.#revision = catalog.revision();
    for (const app of catalog.listApps()) this.#apps.add(app.name);
    for (const host of catalog.listHosts()) this.#hosts.set(host.id, host);
    for (const { spec, status } of catalog.listMachines()) {
      this.#machine(spec.id, spec.app).spec = spec;
      const entry = this.#machines.get(spec.id)!;
      entry.status = status;
      entry.backends = this.#backends(spec, status);
      entry.ports = this.#ports(spec, status);
    }
    for (const ip of catalog.listIpAssignments?.() ?? []) this.#setIp(ip.ip, ip.app);
    for (const app of this.#apps) this.#dirty.add(app);
    this.#table = { version: 0, revision: this.#revision, builtAt: Date.now(), apps: new Map(), ports: new Map() };
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
          if (c.op === 'put' && c.value !== undefined) this.#hosts.set(c.key, c.value);
          else this.#hosts.delete(c.key);
          for (const [id, entry] of this.#machines) {
            if (entry.spec?.host_id === c.key) {
              this.#settle(id, entry);
              touched = true;
            }
          }
          break;
        }
        case 'ip': {
          const app = c.value?.app ?? this.#ipApp.get(c.key);
          if (app === undefined) break;
          this.#setIp(c.key, c.op === 'put' ? app : undefined);
          this.#dirty.add(app);
          touched = true;
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
    const ports = this.#rebuildPorts();
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
    this.#table = Object.freeze({ version: this.#table.version + 1, revision: this.#revision, builtAt: Date.now(), apps, ports });
    return true;
  }

  /** The `ports` of the next snapshot: dirty apps' entries rebuilt (only apps with addresses have one). */
  #rebuildPorts(): ReadonlyMap<string, AppPorts> {
    const ports = new Map(this.#table.ports);
    for (const app of this.#dirty) {
      const ips = this.#appIps.get(app);
      if (!this.#apps.has(app) || ips === undefined) {
        ports.delete(app);
        continue;
      }
      const backends: PortBackend[] = [];
      for (const id of this.#appMachines.get(app) ?? []) backends.push(...(this.#machines.get(id)?.ports ?? []));
      backends.sort((a, b) => (a.machineId < b.machineId ? -1 : a.machineId > b.machineId ? 1 : a.publicPort - b.publicPort));
      ports.set(app, Object.freeze({ ips: Object.freeze([...ips].sort()), backends: Object.freeze(backends) }));
    }
    return ports;
  }

  #setIp(ip: string, app: string | undefined): void {
    const old = this.#ipApp.get(ip);
    if (old !== undefined) {
      this.#appIps.get(old)?.delete(ip);
      if (this.#appIps.get(old)?.size === 0) this.#appIps.delete(old);
      this.#ipApp.delete(ip);
    }
    if (app === undefined) return;
    this.#ipApp.set(ip, app);
    let set = this.#appIps.get(app);
    if (!set) this.#appIps.set(app, (set = new Set()));
    set.add(ip);
  }

  #machine(id: string, app: string): MachineEntry {
    let entry = this.#machines.get(id);
    if (!entry) {
      entry = { app, spec: undefined, status: undefined, backends: [], ports: [] };
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
    const ports = entry.spec === undefined ? [] : this.#ports(entry.spec, entry.status);
    if (!samePortBackends(entry.ports, ports)) entry.ports = ports;
    const fresh = entry.spec === undefined ? [] : this.#backends(entry.spec, entry.status);
    if (fresh.length === 0) {
      entry.backends = fresh;
      return;
    }
    // Keep the old objects when nothing routing-relevant changed (a status heartbeat, an event).
    if (!sameBackends(entry.backends, fresh)) entry.backends = fresh;
  }

  /** A machine's backends, none unless it serves and its host is registered; through the host's backhaul when remote. */
  #backends(spec: MachineSpec, status: MachineStatus | undefined): Backend[] {
    const via = this.#via(spec, status);
    return via === false ? [] : backendsOf(spec, via);
  }

  /** The same for the machine's ports on its app's addresses. */
  #ports(spec: MachineSpec, status: MachineStatus | undefined): PortBackend[] {
    const via = this.#via(spec, status);
    return via === false ? [] : portBackendsOf(spec, via);
  }

  /** False when the machine gets no traffic (not serving, or its host is gone); else the host to go through, undefined for direct. */
  #via(spec: MachineSpec, status: MachineStatus | undefined): Host | undefined | false {
    const host = this.#hosts.get(spec.host_id);
    if (host === undefined || !machineServes(spec, status)) return false;
    return this.#localHost !== undefined && host.id !== this.#localHost ? host : undefined;
  }
}

function sameBackends(a: readonly Backend[], b: readonly Backend[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!;
    const y = b[i]!;
    if (x !== y && (x.machineId !== y.machineId || x.origin !== y.origin || x.via !== y.via || x.instanceId !== y.instanceId || x.region !== y.region
      || x.softLimit !== y.softLimit || x.hardLimit !== y.hardLimit || x.limitType !== y.limitType || x.h2 !== y.h2)) return false;
  }
  return true;
}
