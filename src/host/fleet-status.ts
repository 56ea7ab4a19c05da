// Publishes this host's copy of the etcd catalog (applied revision, staleness) for the fleet, and reads the fleet's back for the API.
import type { EtcdCatalog } from '../catalog/index.ts';
import type { FleetView, HostMirror } from '../api/index.ts';
import type { Logger } from '../shared/log.ts';

type Registration = Awaited<ReturnType<EtcdCatalog['registerHost']>>;

export interface FleetStatusOptions {
  /** How often the host looks whether it has something new to report. Default 2000 ms. */
  intervalMs?: number;
  /** Reports again after this long even when nothing changed, so "last seen" stays recent. Default 15000 ms. */
  refreshMs?: number;
  /** The local copy counts as stale (the API says so in a header) once it has not heard from etcd for this long. Default 3000 ms. */
  staleAfterMs?: number;
}

/**
 * Every `intervalMs` the host reports its copy's applied revision under its registration lease (so the report vanishes
 * with the host), but only when the copy applied a change of fleet state since its last report, or `refreshMs` passed.
 * Reports themselves are not fleet state: one host's report does not make the others report again.
 */
export class EtcdFleetStatus implements FleetView {
  readonly #catalog: EtcdCatalog;
  readonly #hostId: string;
  readonly #registration: Registration;
  readonly #log: Logger;
  readonly #o: Required<FleetStatusOptions>;
  readonly #openedAt = Date.now();
  /** Revision of the newest change of fleet state the local copy applied (host reports are not changes). */
  #dataRevision: number;
  #reported: { dataRevision: number; at: number } | undefined;
  #timer: NodeJS.Timeout | undefined;
  #unsubscribe: (() => void) | undefined;
  #inFlight: Promise<void> | undefined;

  constructor(catalog: EtcdCatalog, hostId: string, registration: Registration, log: Logger, opts: FleetStatusOptions = {}) {
    this.#catalog = catalog;
    this.#hostId = hostId;
    this.#registration = registration;
    this.#log = log;
    this.#o = { intervalMs: 2_000, refreshMs: 15_000, staleAfterMs: 3_000, ...opts };
    this.#dataRevision = catalog.appliedRevision();
  }

  start(): void {
    if (this.#timer) return;
    this.#unsubscribe = this.#catalog.subscribe((batch) => {
      this.#dataRevision = Math.max(this.#dataRevision, batch.revision);
    });
    this.#timer = setInterval(() => this.#tick(), this.#o.intervalMs);
    this.#timer.unref();
    this.#tick();
  }

  async close(): Promise<void> {
    clearInterval(this.#timer);
    this.#unsubscribe?.();
    await this.#inFlight;
  }

  /** Milliseconds since the local copy last heard from etcd (since opening, if it has not yet). */
  #staleness(): number {
    const s = this.#catalog.staleness();
    return Number.isFinite(s) ? s : Date.now() - this.#openedAt;
  }

  catalogStaleMs(): number | undefined {
    const s = this.#staleness();
    return s > this.#o.staleAfterMs ? s : undefined;
  }

  mirrors(): { newest: number; hosts: ReadonlyMap<string, HostMirror> } {
    const hosts = new Map<string, HostMirror>();
    for (const s of this.#catalog.hostStatuses()) {
      hosts.set(s.host_id, { revision: s.revision, staleness_ms: s.staleness_ms, last_seen: s.published_at });
    }
    // This host's own copy: live.
    hosts.set(this.#hostId, { revision: this.#catalog.appliedRevision(), staleness_ms: this.#staleness(), last_seen: new Date().toISOString() });
    return { newest: this.#dataRevision, hosts };
  }

  #tick(): void {
    if (this.#inFlight) return;
    const now = Date.now();
    const data = this.#dataRevision;
    if (this.#reported && this.#reported.dataRevision === data && now - this.#reported.at < this.#o.refreshMs) return;
    this.#inFlight = this.#registration.publishStatus({
      revision: this.#catalog.appliedRevision(),
      staleness_ms: Math.round(this.#staleness()),
      published_at: new Date(now).toISOString(),
    }).then(
      () => { this.#reported = { dataRevision: data, at: now }; },
      // etcd unreachable: the next tick tries again; the API already says the copy is stale.
      (e: unknown) => this.#log.debug({ err: e }, 'could not report the catalog mirror status'),
    ).finally(() => { this.#inFlight = undefined; });
  }
}
