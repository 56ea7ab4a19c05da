// fly-replay: a machine answers with a `fly-replay` header instead of a response, and the proxy sends the request to
// another machine (of a region, a named instance, or any other one) as Fly's proxy does.
import type { Backend } from './routing.ts';

/** A parsed `fly-replay` value, e.g. `region=ams`, `instance=148e21…`, `elsewhere=true`, with an optional `state`. */
export interface Replay {
  readonly region: string | undefined;
  readonly instance: string | undefined;
  readonly elsewhere: boolean;
  /** Passed to the next machine in `fly-replay-src` (the app's own note to itself). */
  readonly state: string | undefined;
}

/** Most replays of one request: a machine that replays to one that replays back ends here. */
export const maxReplays = 3;

/** Parses `key=value;key=value`; undefined when it names no target. */
export function parseReplay(value: string): Replay | undefined {
  let region: string | undefined;
  let instance: string | undefined;
  let elsewhere = false;
  let state: string | undefined;
  for (const part of value.split(';')) {
    const eq = part.indexOf('=');
    if (eq === -1) continue;
    const key = part.slice(0, eq).trim().toLowerCase();
    const v = part.slice(eq + 1).trim();
    if (key === 'region') region = v.split(',')[0]?.trim().toLowerCase() || undefined;
    else if (key === 'instance') instance = v || undefined;
    else if (key === 'elsewhere') elsewhere = v === 'true';
    else if (key === 'state') state = v;
  }
  if (region === undefined && instance === undefined && !elsewhere) return undefined;
  return { region, instance, elsewhere, state };
}

/**
 * The backend a replay goes to, not yet counted: the named instance, else one of the region, else (elsewhere) any
 * machine but `from`; always below its hard limit, least loaded first. Undefined when none qualifies.
 */
export function replayTarget(backends: readonly Backend[], r: Replay, from: Backend): Backend | undefined {
  let best: Backend | undefined;
  for (const b of backends) {
    if (b.inflight >= b.hardLimit) continue;
    if (r.instance !== undefined ? b.machineId !== r.instance : r.region !== undefined ? b.region !== r.region : b.machineId === from.machineId) continue;
    if (best === undefined || b.inflight < best.inflight) best = b;
  }
  return best;
}

/** The `fly-replay-src` header the next machine gets: where the request was replayed from. */
export function replaySource(from: Backend, r: Replay): string {
  return `instance=${from.machineId};region=${from.region};t=${Date.now() * 1000}${r.state === undefined ? '' : `;state=${r.state}`}`;
}
