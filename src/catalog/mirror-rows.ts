// Catalog rows as the mirror reads them from etcd: validated from their JSON, written to a copy, turned into changes.
import { z } from 'zod';
import { errorMessage } from '../shared/errors.ts';
import type { KeyRow } from './keys.ts';
import { compileRowChecks } from './row-check.ts';
import {
  appSchema, certificateSchema, hostSchema, ipAssignmentSchema, leaseSchema, machineEventSchema, machineSpecSchema, machineStatusSchema, orgSchema, tokenSchema,
} from './schemas.ts';
import type { CatalogStore } from './store.ts';
import type {
  ApiToken, App, CatalogChange, Certificate, Host, IpAssignment, Lease, MachineEvent, MachineSpec, MachineStatus, Org,
} from './types.ts';

/** A validated row with its JSON text as read (the schemas have no defaults or transforms, so it is the value). */
export type Row = { body: string } & (
  | { table: 'org'; value: Org } | { table: 'token'; value: ApiToken } | { table: 'app'; value: App }
  | { table: 'spec'; value: MachineSpec } | { table: 'status'; value: MachineStatus } | { table: 'event'; value: MachineEvent }
  | { table: 'lease'; value: Lease } | { table: 'host'; value: Host } | { table: 'certificate'; value: Certificate }
  | { table: 'ip'; value: IpAssignment });

/** Why a value was left out of the copy: a log message and its fields. */
export interface RowProblem { msg: string; fields: Record<string, unknown> }

const schemas = {
  org: orgSchema, token: tokenSchema, app: appSchema, spec: machineSpecSchema, status: machineStatusSchema,
  event: machineEventSchema, lease: leaseSchema, host: hostSchema, certificate: certificateSchema,
  ip: ipAssignmentSchema,
} as const;
/** The schemas, precompiled on first use: the mirror checks every row it loads. */
let rowChecks: ReturnType<typeof compileRowChecks<typeof schemas>> | undefined;

/** Validates the JSON text of a row read from etcd; an invalid one comes back as the problem to log. */
export function parseRow(where: KeyRow, body: string): Row | RowProblem {
  let json: unknown;
  try {
    json = JSON.parse(body);
  } catch (e) {
    return { msg: 'catalog value is not JSON; ignored', fields: { err: errorMessage(e) } };
  }
  rowChecks ??= compileRowChecks(schemas);
  const r = rowChecks[where.table](json);
  if (!r.success) return { msg: 'catalog value does not match its schema; ignored', fields: { issues: r.error.issues } };
  return { table: where.table, value: r.data, body } as Row;
}

/** True for a parsed row, false for a problem. */
export function isRow(r: Row | RowProblem): r is Row {
  return 'table' in r;
}

/** Writes a row into a copy (inside the caller's transaction); false when it changed nothing (an event already there). */
export function writeRow(s: CatalogStore, row: Row): boolean {
  switch (row.table) {
    case 'org': s.putOrg(row.value, row.body); return true;
    case 'token': s.putToken(row.value, row.body); return true;
    case 'app': s.putApp(row.value, row.body); return true;
    case 'spec': s.putSpec(row.value, row.body); return true;
    case 'status': s.putStatus(row.value, row.body); return true;
    case 'event': return s.insertEvent(row.value, row.body);
    case 'lease': s.putLease(row.value, row.body); return true;
    case 'host': s.putHost(row.value, row.body); return true;
    case 'certificate': s.putCertificate(row.value, row.body); return true;
    case 'ip': s.putIpAssignment(row.value, row.body); return true;
  }
}

/** The change consumers are told about when `row` is put (none for tokens). */
export function putChange(row: Row): CatalogChange | undefined {
  switch (row.table) {
    case 'org': return { kind: 'org', op: 'put', key: row.value.slug, value: row.value };
    case 'token': return undefined;
    case 'app': return { kind: 'app', op: 'put', key: row.value.name, value: row.value };
    case 'spec': return { kind: 'machine_spec', op: 'put', key: row.value.id, value: row.value };
    case 'status': return { kind: 'machine_status', op: 'put', key: row.value.id, value: row.value };
    case 'event': return { kind: 'machine_event', op: 'put', key: row.value.id, value: row.value };
    case 'lease': return { kind: 'lease', op: 'put', key: row.value.machine_id, value: row.value };
    case 'host': return { kind: 'host', op: 'put', key: row.value.id, value: row.value };
    case 'certificate': return { kind: 'certificate', op: 'put', key: row.value.hostname, value: row.value };
    case 'ip': return { kind: 'ip', op: 'put', key: row.value.ip, value: row.value };
  }
}

/**
 * What a host reports about its copy of the catalog, at `<prefix>host-status/<id>` under the host's registration lease
 * (so it vanishes with the host). Kept beside the rows in table host_status; not a change consumers are told about.
 */
export interface HostMirrorStatus {
  host_id: string;
  /** The etcd revision the host's copy had applied when it reported. */
  revision: number;
  /** Milliseconds since the host's copy had last heard from etcd, when it reported. */
  staleness_ms: number;
  /** When the host reported (ISO time). */
  published_at: string;
}

export const hostMirrorStatusSchema = z.strictObject({
  host_id: z.string().min(1),
  revision: z.number().int().nonnegative(),
  staleness_ms: z.number().nonnegative(),
  published_at: z.string(),
});

/** The table of hosts' mirror statuses in a copy, keyed by host id. */
export const hostStatusTable = 'CREATE TABLE IF NOT EXISTS host_status (id TEXT PRIMARY KEY, body TEXT NOT NULL)';

/** The JSON to store for host `id`'s reported status, or undefined (to log and leave out) if it is not valid. */
export function hostStatusBody(id: string, body: string): string | undefined {
  let r: ReturnType<typeof hostMirrorStatusSchema.safeParse> | undefined;
  try {
    r = hostMirrorStatusSchema.safeParse(JSON.parse(body));
  } catch { /* not JSON */ }
  return r?.success && r.data.host_id === id ? JSON.stringify(r.data) : undefined;
}

/** The host id of a `<prefix>host-status/<id>` key, or undefined for any other key. */
export function hostStatusIdOf(prefix: string, key: string): string | undefined {
  const top = `${prefix}host-status/`;
  if (!key.startsWith(top)) return undefined;
  const rest = key.slice(top.length);
  return rest !== '' && !rest.includes('/') ? decodeURIComponent(rest) : undefined;
}
