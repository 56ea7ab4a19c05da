// Placement: picks the worker host for a machine by region, free cpus and memory, spreading an app's machines.
import { defaultGuest, type CatalogReader, type GuestConfig, type Host, type Machine } from '../catalog/index.ts';
import { TarmacError } from '../shared/errors.ts';

/**
 * Shared vCPUs are time slices, as on Fly (a shared-cpu-1x has 1/16 of a core guaranteed), so a core
 * holds this many of them; performance vCPUs take a whole core each. Memory is never overcommitted.
 */
export const sharedCpusPerCore = 16;

export interface Demand {
  /** Cores, fractional for shared vCPUs. */
  cores: number;
  memory_mb: number;
}

export function demandOf(guest: GuestConfig | undefined): Demand {
  const cpus = guest?.cpus ?? defaultGuest.cpus;
  const kind = guest?.cpu_kind ?? defaultGuest.cpu_kind;
  return {
    cores: kind === 'performance' ? cpus : cpus / sharedCpusPerCore,
    memory_mb: guest?.memory_mb ?? defaultGuest.memory_mb,
  };
}

function occupies(m: Machine): boolean {
  return m.spec.desired !== 'destroyed' && m.status?.state !== 'destroyed';
}

/** Cores and memory taken on `host` by its machines that are not destroyed, leaving out `exceptId`. */
export function usedOn(catalog: CatalogReader, hostId: string, exceptId?: string): Demand {
  const used: Demand = { cores: 0, memory_mb: 0 };
  for (const m of catalog.listMachines({ host_id: hostId, include_deleted: true })) {
    if (m.spec.id === exceptId || !occupies(m)) continue;
    const d = demandOf(m.spec.config.guest);
    used.cores += d.cores;
    used.memory_mb += d.memory_mb;
  }
  return used;
}

export function fits(host: Host, used: Demand, want: Demand): boolean {
  return used.cores + want.cores <= host.cpus + 1e-9 && used.memory_mb + want.memory_mb <= host.memory_mb;
}

function describe(want: Demand): string {
  return `${want.cores < 1 ? want.cores.toFixed(3).replace(/0+$/, '') : want.cores} cores and ${want.memory_mb} MB`;
}

/** Chooses a worker in `region` with room for `want`: fewest machines of `app` first, then most free memory. */
export function placeMachine(catalog: CatalogReader, region: string, app: string, want: Demand): Host {
  const workers = catalog.listHosts().filter((h) => h.roles.includes('worker'));
  const inRegion = workers.filter((h) => h.region === region);
  if (inRegion.length === 0) {
    const regions = [...new Set(workers.map((h) => h.region))].sort();
    throw new TarmacError('no_capacity', `no worker host serves region "${region}"${regions.length ? ` (regions with workers: ${regions.join(', ')})` : ' (no worker host has registered yet)'}`);
  }
  let best: { host: Host; sameApp: number; freeMem: number } | undefined;
  for (const host of inRegion) {
    const used = usedOn(catalog, host.id);
    if (!fits(host, used, want)) continue;
    const sameApp = catalog.listMachines({ app, host_id: host.id }).length;
    const freeMem = host.memory_mb - used.memory_mb;
    if (!best || sameApp < best.sameApp || (sameApp === best.sameApp && freeMem > best.freeMem)) best = { host, sameApp, freeMem };
  }
  if (!best) {
    throw new TarmacError('no_capacity', `no worker host in region "${region}" has room for ${describe(want)}; destroy machines or choose a smaller guest`);
  }
  return best.host;
}
