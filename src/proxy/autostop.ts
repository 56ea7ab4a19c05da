// Autostop: stops this host's machines that served no request for an idle time, down to each app's min_machines_running.
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import type { Catalog, CatalogReader, MachineConfig, MachineEvent, MachineSpec } from '../catalog/index.ts';
import { newUlid } from '../shared/ids.ts';
import type { Logger } from '../shared/log.ts';
import { proxyRequestChannel, type ProxyRequestEvent } from './proxy.ts';
import type { RoutingTable } from './routing.ts';

/**
 * Who decides: the proxy of the host a machine runs on. It is the one that delivers every request to its machines
 * (directly, or as the end of an edge's backhaul), so it alone sees all of a machine's traffic; an edge sees only its
 * share. Each host stops only its own machines; the minimum counts the app's started machines on every host.
 */
export interface AutostopOptions {
  /** The routing table of this host's proxy (in-flight counts per backend). */
  routes: () => RoutingTable;
  catalog: Pick<CatalogReader, 'listMachines'>;
  hostId: string;
  /** A machine with nothing in flight and no request finished for this long is idle. */
  idleMs: number;
  /** Asks for a machine to stop (see `stopIdleMachine`). */
  stop(machineId: string): Promise<unknown>;
  log: Logger;
}

export interface RunningAutostop {
  close(): void;
}

/** True when a config asks for autostop: a service with `autostop` "stop" (or true, or "suspend", done as a stop). */
export function autostopEnabled(config: MachineConfig): boolean {
  return (config.services ?? []).some((s) => s.autostop === true || s.autostop === 'stop' || s.autostop === 'suspend');
}

/** The most `min_machines_running` any service of the config asks for (0 when none does). */
function minRunning(config: MachineConfig): number {
  return Math.max(0, ...(config.services ?? []).map((s) => s.min_machines_running ?? 0));
}

/** Writes a stop of a started machine as the API's /stop does; false when it is no longer wanted started. */
export async function stopIdleMachine(catalog: Catalog, machineId: string): Promise<boolean> {
  const m = catalog.getMachine(machineId);
  if (!m || m.spec.desired !== 'started') return false;
  const event: MachineEvent = {
    id: newUlid(), machine_id: machineId, type: 'stop', status: 'pending', source: 'user', timestamp: Date.now(), request: { autostop: true },
  };
  const spec: MachineSpec = { ...m.spec, desired: 'stopped', updated_at: new Date().toISOString() };
  delete spec.stop; // stop_config applies, not the parameters of an earlier /stop
  await catalog.updateMachineSpec(spec, m.spec.version, [event]);
  return true;
}

/**
 * Checks every half idle time (at most every 30 s) which of this host's routed machines with autostop are idle: none
 * of their requests in flight and none finished within `idleMs` (a machine first seen routing counts as active then).
 * Idle machines are stopped, the longest idle first, while the app keeps more started machines than its minimum.
 */
export function startAutostop(opts: AutostopOptions): RunningAutostop {
  const lastActive = new Map<string, number>();
  const onRequest = (msg: unknown) => {
    const id = (msg as ProxyRequestEvent).machineId;
    if (id !== undefined) lastActive.set(id, Date.now());
  };
  subscribe(proxyRequestChannel, onRequest);
  const stopping = new Set<string>();

  const tick = () => {
    const now = Date.now();
    const routed = new Set<string>();
    for (const route of opts.routes().apps.values()) {
      for (const b of route.backends) {
        routed.add(b.machineId);
        if (b.inflight > 0 || !lastActive.has(b.machineId)) lastActive.set(b.machineId, now);
      }
    }
    for (const id of lastActive.keys()) if (!routed.has(id)) lastActive.delete(id);
    const apps = new Map<string, { started: number; min: number; idle: Array<{ id: string; since: number }> }>();
    for (const { spec, status } of opts.catalog.listMachines()) {
      if (spec.desired !== 'started' || status?.state !== 'started') continue;
      let a = apps.get(spec.app);
      if (a === undefined) apps.set(spec.app, (a = { started: 0, min: 0, idle: [] }));
      a.started++;
      a.min = Math.max(a.min, minRunning(spec.config));
      const since = lastActive.get(spec.id);
      if (spec.host_id === opts.hostId && since !== undefined && now - since >= opts.idleMs && autostopEnabled(spec.config) && !stopping.has(spec.id)) {
        a.idle.push({ id: spec.id, since });
      }
    }
    for (const [app, a] of apps) {
      a.idle.sort((x, y) => x.since - y.since);
      for (const { id } of a.idle.slice(0, Math.max(0, a.started - a.min))) {
        stopping.add(id);
        lastActive.delete(id);
        opts.log.info({ app, machine: id, idle_ms: opts.idleMs }, 'autostopping idle machine');
        opts.stop(id)
          .catch((err: unknown) => opts.log.warn({ app, machine: id, err }, 'autostop request failed'))
          .finally(() => stopping.delete(id));
      }
    }
  };
  const timer = setInterval(() => {
    try {
      tick();
    } catch (err) {
      opts.log.error({ err }, 'autostop check failed');
    }
  }, Math.min(30_000, Math.max(50, opts.idleMs / 2)));
  timer.unref();
  return {
    close() {
      clearInterval(timer);
      unsubscribe(proxyRequestChannel, onRequest);
    },
  };
}
