// Autostart: a request for an app without spare capacity starts one of its stopped machines and waits until it routes.
import type { Catalog, CatalogReader, MachineEvent, MachineSpec, MachineStatus } from '../catalog/index.ts';
import { newUlid } from '../shared/ids.ts';
import type { Logger } from '../shared/log.ts';
import { backendsOf, type AppRoute, type Backend, type RoutingTable } from './routing.ts';

/** What the proxy needs to start machines: a catalog to read from and a start request the host wires to the catalog. */
export interface AutostartOptions {
  catalog: Pick<CatalogReader, 'listMachines' | 'getMachine' | 'subscribe'>;
  /** Asks for a stopped machine to start (see `startStoppedMachine`); rejects when it could not be asked. */
  start(machineId: string): Promise<unknown>;
  /** How long a start may take to route before it no longer counts as capacity on its way. Default 60 s. */
  startTimeoutMs?: number;
}

/**
 * True when a request may start the machine: it is stopped (by request, or exited by itself), not cordoned, and it has
 * an http service with `autostart` not false (Fly's default is on) and no `disable_machine_autostart`.
 */
export function autostartable(spec: MachineSpec, status: MachineStatus | undefined): boolean {
  if (spec.desired === 'destroyed' || spec.cordoned || spec.config.disable_machine_autostart === true) return false;
  const state = status?.state ?? 'created';
  const stopped = state === 'stopped' || (state === 'created' && spec.desired === 'stopped');
  return stopped && (spec.config.services ?? []).every((s) => s.autostart !== false) && backendsOf(spec).length > 0;
}

/** Writes a start of a stopped machine as the API's /start does (desired started, a new restart generation); false when it no longer is stopped. */
export async function startStoppedMachine(catalog: Catalog, machineId: string): Promise<boolean> {
  const m = catalog.getMachine(machineId);
  if (!m || !autostartable(m.spec, m.status)) return false;
  const event: MachineEvent = {
    id: newUlid(), machine_id: machineId, type: 'start', status: 'pending', source: 'user', timestamp: Date.now(), request: { autostart: true },
  };
  const spec: MachineSpec = { ...m.spec, desired: 'started', restart_generation: m.spec.restart_generation + 1, updated_at: new Date().toISOString() };
  await catalog.updateMachineSpec(spec, m.spec.version, [event]);
  return true;
}

/** After an autostarted machine routes, its app gets this long to accept connections: requests that find it refusing retry. */
const warmupMs = 10_000;
const warmupRetryMs = 50;

interface Candidate {
  readonly id: string;
  readonly region: string;
  /** Requests it takes before it counts as busy: its soft limit. */
  readonly capacity: number;
}

interface Pending extends Candidate {
  readonly timer: NodeJS.Timeout;
}

/**
 * The proxy's autostart decisions. It keeps, from the catalog, which machines of each app could be started, and the
 * starts under way; `demand` starts machines only until the starts under way cover the demand (each counts for its
 * soft limit of requests), so a burst starts no more machines than it needs.
 */
export class Autostarter {
  readonly #o: AutostartOptions;
  readonly #region: string;
  readonly #log: Logger;
  /** app → machine id → a machine that could be started. */
  readonly #startable = new Map<string, Map<string, Candidate>>();
  /** app → machine id → a start under way. */
  readonly #pending = new Map<string, Map<string, Pending>>();
  /** Autostarted machines that route → until when a refused connection to them is retried (their app may not listen yet). */
  readonly #warming = new Map<string, number>();
  readonly #unsubscribe: () => void;

  constructor(opts: AutostartOptions, region: string, log: Logger) {
    this.#o = opts;
    this.#region = region;
    this.#log = log;
    for (const { spec, status } of opts.catalog.listMachines()) this.#update(spec.id, spec, status);
    this.#unsubscribe = opts.catalog.subscribe((batch) => {
      for (const c of batch.changes) {
        if (c.kind !== 'machine_spec' && c.kind !== 'machine_status') continue;
        const m = opts.catalog.getMachine(c.key);
        this.#update(c.key, m?.spec, m?.status);
      }
    });
  }

  /** True when a request for `app`, which has no machine to take it, should wait: a start is under way or can begin. */
  canStart(app: string): boolean {
    return this.#pending.has(app) || this.#startable.has(app);
  }

  /** True while a start for `app` is under way. */
  starting(app: string): boolean {
    return this.#pending.has(app);
  }

  /**
   * Capacity is short for `route`: `waiting` requests wait in its queue, or (0) every started machine is past its soft
   * limit. Starts stopped machines, those of this region first, until the starts under way cover the demand.
   */
  demand(route: AppRoute, waiting: number): void {
    const app = route.app;
    let covered = 0;
    for (const p of this.#pending.get(app)?.values() ?? []) covered += p.capacity;
    while (covered < Math.max(1, waiting)) {
      const c = this.#pick(app);
      if (c === undefined) return;
      covered += c.capacity;
      this.#launch(app, c);
    }
  }

  /** After a routing swap: a start whose machine now routes is done, and the machine warms up. */
  routed(table: RoutingTable): void {
    for (const [app, pending] of this.#pending) {
      const backends = table.apps.get(app)?.backends ?? [];
      for (const id of pending.keys()) {
        if (!backends.some((b) => b.machineId === id)) continue;
        this.#settle(app, id);
        this.#warming.set(id, Date.now() + warmupMs);
      }
    }
  }

  /**
   * A connection to `b` was refused and no other machine can take the request: when `b` was autostarted moments ago,
   * or (a machine of this host, which may have been started by another host's proxy) its worker reported it started
   * moments ago, its app may still be starting to listen: calls `again` a little later and returns true.
   */
  retryWarming(b: Backend, again: () => void): boolean {
    let until = this.#warming.get(b.machineId);
    if (until === undefined && b.via === undefined) {
      const status = this.#o.catalog.getMachine(b.machineId)?.status;
      if (status?.state === 'started') {
        until = Date.parse(status.updated_at) + warmupMs;
        if (until > Date.now()) this.#warming.set(b.machineId, until);
      }
    }
    if (until === undefined) return false;
    if (Date.now() >= until) {
      this.#warming.delete(b.machineId);
      return false;
    }
    setTimeout(again, warmupRetryMs);
    return true;
  }

  close(): void {
    this.#unsubscribe();
    for (const pending of this.#pending.values()) for (const p of pending.values()) clearTimeout(p.timer);
    this.#pending.clear();
  }

  #pick(app: string): Candidate | undefined {
    const startable = this.#startable.get(app);
    if (startable === undefined) return undefined;
    let any: Candidate | undefined;
    for (const c of startable.values()) {
      if (c.region === this.#region) return c;
      any ??= c;
    }
    return any;
  }

  #launch(app: string, c: Candidate): void {
    this.#forget(app, c.id);
    const timer = setTimeout(() => {
      this.#log.warn({ app, machine: c.id }, 'autostarted machine did not route in time; it no longer counts as capacity on its way');
      this.#settle(app, c.id);
    }, this.#o.startTimeoutMs ?? 60_000);
    timer.unref();
    let pending = this.#pending.get(app);
    if (pending === undefined) this.#pending.set(app, (pending = new Map()));
    pending.set(c.id, { ...c, timer });
    this.#log.info({ app, machine: c.id }, 'autostarting machine');
    this.#o.start(c.id).catch((err: unknown) => {
      this.#log.warn({ app, machine: c.id, err }, 'autostart request failed');
      this.#settle(app, c.id);
    });
  }

  #settle(app: string, id: string): void {
    const pending = this.#pending.get(app);
    const p = pending?.get(id);
    if (pending === undefined || p === undefined) return;
    clearTimeout(p.timer);
    pending.delete(id);
    if (pending.size === 0) this.#pending.delete(app);
  }

  #forget(app: string, id: string): void {
    const startable = this.#startable.get(app);
    if (startable?.delete(id) && startable.size === 0) this.#startable.delete(app);
  }

  /** Re-reads one machine after a change: whether it could be started, and whether a start of it failed. */
  #update(id: string, spec: MachineSpec | undefined, status: MachineStatus | undefined): void {
    if (spec === undefined || spec.desired !== 'started') this.#warming.delete(id);
    if (spec === undefined) {
      for (const app of [...this.#startable.keys()]) this.#forget(app, id);
      for (const app of [...this.#pending.keys()]) this.#settle(app, id);
      return;
    }
    const app = spec.app;
    // A start of ours that the worker answered with a failure (or that someone undid) is over.
    const answered = status !== undefined && status.restart_generation === spec.restart_generation;
    if (spec.desired !== 'started' || (answered && (status.state === 'failed' || status.state === 'stopped'))) this.#settle(app, id);
    if (this.#pending.get(app)?.has(id) || !autostartable(spec, status)) {
      this.#forget(app, id);
      return;
    }
    let startable = this.#startable.get(app);
    if (startable === undefined) this.#startable.set(app, (startable = new Map()));
    startable.set(id, { id, region: spec.region, capacity: Math.max(1, backendsOf(spec)[0]!.softLimit) });
  }
}
