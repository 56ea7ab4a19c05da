// `GET /v1/hosts` (a Tarmac extension, admin only): every registered host with its catalog copy's revision, lag and staleness.
import type { CatalogReader } from '../catalog/index.ts';
import type { HostResponse, ListHostsResponse } from '../client/index.ts';
import { TarmacError } from '../shared/errors.ts';
import { sendJson } from './http.ts';
import type { Ctx } from './routes.ts';

/** What one host last reported about its copy of the catalog. */
export interface HostMirror {
  /** The catalog revision its copy had applied. */
  revision: number;
  /** Milliseconds since its copy had last heard from the catalog, when it reported. */
  staleness_ms: number;
  /** When it reported (ISO time); this host's own entry is live. */
  last_seen: string;
}

/** The fleet's catalog copies, as the host running the API sees them (the host wires it; see src/host/fleet-status.ts). */
export interface FleetView {
  /** How stale this host's copy of the catalog is, in ms, when it is not current; undefined while it is. */
  catalogStaleMs(): number | undefined;
  /**
   * Each host's report (hosts that never reported are missing) and the newest revision of fleet state this host
   * knows, which lag is counted from.
   */
  mirrors(): { newest: number; hosts: ReadonlyMap<string, HostMirror> };
}

/** The embedded catalog is one file on one host: always current, every host at its revision. */
export function embeddedFleetView(catalog: CatalogReader): FleetView {
  return {
    catalogStaleMs: () => undefined,
    mirrors: () => {
      const revision = catalog.revision();
      const at = new Date().toISOString();
      return { newest: revision, hosts: new Map(catalog.listHosts().map((h) => [h.id, { revision, staleness_ms: 0, last_seen: at }])) };
    },
  };
}

export async function listHosts(ctx: Ctx): Promise<void> {
  if (ctx.principal.kind !== 'admin') throw new TarmacError('forbidden', 'listing the fleet\'s hosts needs an admin token');
  const { catalog, fleet } = ctx.deps;
  const { newest, hosts: mirrors } = fleet.mirrors();
  const hosts: HostResponse[] = catalog.listHosts().map((h) => {
    const m = mirrors.get(h.id);
    return {
      id: h.id,
      region: h.region,
      roles: [...h.roles],
      address: h.address,
      host_number: h.host_number,
      capacity: { cpus: h.cpus, memory_mb: h.memory_mb },
      machines: catalog.listMachines({ host_id: h.id }).length,
      revision: m?.revision ?? null,
      lag: m ? Math.max(0, newest - m.revision) : null,
      staleness_ms: m ? Math.round(m.staleness_ms) : null,
      last_seen: m?.last_seen ?? null,
    };
  });
  const body: ListHostsResponse = { total_hosts: hosts.length, revision: newest, hosts };
  sendJson(ctx.res, 200, body);
}
