// The Machines API v1 routes: apps, machines and their lifecycle actions, leases, events, wait and logs.
import { constants as osConstants } from 'node:os';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { z } from 'zod';
import {
  durationMs, durationSchema, machineAddress, machineConfigSchema, machineStates, stopConfigSchema,
  type Catalog, type Machine, type MachineEvent, type MachineSpec, type MachineState,
} from '../catalog/index.ts';
import type { Logger } from '../shared/log.ts';
import { TarmacError } from '../shared/errors.ts';
import { newMachineId, newNonce, newUlid } from '../shared/ids.ts';
import type { MachineResponse } from '../client/index.ts';
import { canSeeOrg, visibleApp, type Principal } from './auth.ts';
import { readJsonBody, sendJson } from './http.ts';
import { parseInput } from '../shared/validation.ts';
import { listHosts, type FleetView } from './hosts.ts';
import { certificateRoutes } from './certificates.ts';
import { ipRoutes } from './ips.ts';
import { wireguardRoutes } from './wireguard.ts';
import type { IpPool } from '../shared/ip-pool.ts';
import { demandOf, fits, placeMachine, usedOn } from './placement.ts';
import { machineEventsShown, machineState, presentApp, presentEvent, presentLease, presentMachine } from './present.ts';

/** What the API needs from the worker that hosts a machine (single host: the local orchestrator; later: RPC). */
export interface WorkerLink {
  signal(machineId: string, signal: string): Promise<void>;
  logs(
    machineIds: string[],
    opts: { follow: boolean; signal: AbortSignal; since?: Date },
  ): AsyncIterable<{ timestamp: string; machine_id: string; stream: 'stdout' | 'stderr'; message: string }>;
}

export interface Deps {
  catalog: Catalog;
  region: string;
  workers: WorkerLink | undefined;
  fleet: FleetView;
  /** Where app addresses (ip_assignments) come from. */
  ipPool: IpPool;
  /** The proxy's apps domain (`<app>.<domain>` routes to the app by name). */
  appsDomain: string;
}

export interface Ctx {
  req: IncomingMessage;
  res: ServerResponse;
  params: Record<string, string | undefined>;
  query: URLSearchParams;
  principal: Principal;
  log: Logger;
  /** Aborts when the client goes away or the server closes. */
  signal: AbortSignal;
  deps: Deps;
}

export interface Route {
  method: 'GET' | 'POST' | 'DELETE';
  path: string;
  handler: (ctx: Ctx) => Promise<void>;
}

// ---- input schemas ----

const appName = z.string().regex(/^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/, 'must be 1-63 lowercase letters, digits and dashes, not starting or ending with a dash');
const machineName = z.string().regex(/^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})$/, 'must be 1-63 letters, digits, ".", "_" or "-", starting with a letter or digit');
const regionCode = z.string().regex(/^[a-z0-9-]{2,32}$/, 'must be a region code like "ord" or "local"');

/**
 * Fly documents `app_name`; fly-go's flaps client sends `name`, `app_role_id`, and empty strings for
 * fields it leaves unset (Go zero values), so both spellings are accepted and "" means "not given".
 */
const createAppSchema = z.strictObject({
  app_name: appName.optional(),
  name: appName.optional(),
  org_slug: z.string().optional(),
  network: z.union([z.literal(''), z.string().regex(/^[a-z0-9_-]{1,63}$/, 'must be 1-63 lowercase letters, digits, "_" or "-"')]).optional(),
  enable_subdomains: z.boolean().optional(),
  app_role_id: z.string().optional(),
});

const machineRequestFields = {
  name: machineName.optional(),
  region: regionCode.optional(),
  config: machineConfigSchema,
  skip_launch: z.boolean().optional(),
  lease_ttl: z.number().int().min(1).max(86_400).optional(),
  // Fly: "like a combined Create and Cordon": the machine stays out of routing until uncordoned.
  skip_service_registration: z.boolean().optional(),
  // Fly create fields accepted and kept out of the way:
  skip_secrets: z.boolean().optional(),
  lsvd: z.boolean().optional(),
  min_secrets_version: z.number().int().min(0).optional(),
  host_dedication_id: z.string().optional(),
};
const createMachineSchema = z.strictObject(machineRequestFields);
const updateMachineSchema = z.strictObject({ ...machineRequestFields, current_version: z.string().optional() });

const signalNames = Object.keys(osConstants.signals).filter((s) => /^SIG[A-Z0-9]+$/.test(s) && s !== 'SIGUNUSED');
const signalByNumber = new Map(Object.entries(osConstants.signals).map(([name, n]) => [n as number, name]));
const signalSchema = z.union([
  z.string().transform((s, ctx) => {
    const name = s.toUpperCase().startsWith('SIG') ? s.toUpperCase() : `SIG${s.toUpperCase()}`;
    if (!signalNames.includes(name)) {
      ctx.addIssue({ code: 'custom', message: `"${s}" is not a signal name like "SIGTERM"` });
      return z.NEVER;
    }
    return name;
  }),
  z.number().int().min(1).max(64).transform((n, ctx) => {
    const name = signalByNumber.get(n);
    if (!name) {
      ctx.addIssue({ code: 'custom', message: `${n} is not a signal number` });
      return z.NEVER;
    }
    return name;
  }),
]);

/**
 * Fly accepts a Go duration string, `{"time.Duration": ns}`, or (here) a number of seconds; Fly's docs call
 * the field "seconds to wait" typed string, so a string of digits is seconds too.
 */
const stopTimeoutSchema = z.union([
  z.string().regex(/^\d+$/).transform((s) => Number(s) * 1000),
  z.string().refine((s) => durationSchema.safeParse(s).success, 'must be a duration like "10s" or "500ms"').transform((d) => durationMs(d)),
  z.number().nonnegative().max(86_400).transform((s) => s * 1000),
  z.strictObject({ 'time.Duration': z.number().int().nonnegative() }).transform((o) => o['time.Duration'] / 1e6),
]);
const stopSchema = z.strictObject({
  // fly-go's StopMachineInput carries the machine's id in the body.
  id: z.string().optional(),
  signal: stopConfigSchema.shape.signal,
  timeout: stopTimeoutSchema.optional(),
});
const leaseSchema = z.strictObject({
  ttl: z.number().int().min(1).max(86_400).optional(),
  description: z.string().max(256).optional(),
});
const signalBodySchema = z.strictObject({ signal: signalSchema });

const waitStates = [...machineStates, 'suspended', 'settled'] as const;
type WaitState = (typeof waitStates)[number];
/** What `settled` means: a state the machine rests in, not one on its way to another. */
const settledStates: ReadonlySet<MachineState | 'suspended'> = new Set(['started', 'stopped', 'failed', 'destroyed', 'suspended']);

// ---- helpers ----

function event(machine_id: string, type: MachineEvent['type'], status: string, request?: Record<string, unknown>): MachineEvent {
  const e: MachineEvent = { id: newUlid(), machine_id, type, status, source: 'user', timestamp: Date.now() };
  if (request) e.request = request;
  return e;
}

function now(): string {
  return new Date().toISOString();
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function flag(query: URLSearchParams, name: string): boolean {
  const v = query.get(name);
  if (v === null) return false;
  if (v === '' || v === 'true' || v === '1') return true;
  if (v === 'false' || v === '0') return false;
  throw new TarmacError('invalid_argument', `${name}: must be true or false`);
}

function param(ctx: Ctx, name: string): string {
  return ctx.params[name] ?? '';
}

/** The machine `id` of the app in the route, visible to the caller; 404 otherwise. */
function visibleMachine(ctx: Ctx): Machine {
  const app = visibleApp(ctx.deps.catalog, ctx.principal, param(ctx, 'app'));
  const id = param(ctx, 'id');
  const m = ctx.deps.catalog.getMachine(id);
  if (!m || m.spec.app !== app.name) throw new TarmacError('machine_not_found', `machine ${id} not found in app "${app.name}"`);
  return m;
}

/** Refuses a change to a leased machine unless the request carries the lease's nonce. */
function checkLease(ctx: Ctx, id: string): void {
  const lease = ctx.deps.catalog.getLease(id);
  if (!lease || lease.expires_at <= Date.now() / 1000) return;
  const nonce = ctx.req.headers['fly-machine-lease-nonce'];
  if (nonce === lease.nonce) return;
  throw new TarmacError(
    'lease_held',
    `machine ${id} is leased by ${lease.owner} until ${new Date(lease.expires_at * 1000).toISOString()}; ${nonce ? 'the fly-machine-lease-nonce header does not match the lease' : 'send its nonce in the fly-machine-lease-nonce header'}`,
  );
}

function notDestroyed(m: Machine): void {
  if (m.spec.desired === 'destroyed' || m.status?.state === 'destroyed') {
    throw new TarmacError('failed_precondition', `machine ${m.spec.id} is destroyed`);
  }
}

function machineJson(deps: Deps, m: Machine): MachineResponse {
  return presentMachine(m, deps.catalog.listEvents(m.spec.id, machineEventsShown), deps.catalog.getLease(m.spec.id));
}

async function writeSpec(deps: Deps, m: Machine, change: Partial<MachineSpec>, events: MachineEvent[]): Promise<Machine> {
  const spec: MachineSpec = { ...m.spec, ...change, updated_at: now() };
  await deps.catalog.updateMachineSpec(spec, m.spec.version, events);
  return deps.catalog.getMachine(spec.id) ?? { spec, status: m.status };
}

const adjectives = ['autumn', 'bold', 'brisk', 'calm', 'crimson', 'damp', 'dry', 'floral', 'frosty', 'gentle', 'holy', 'late', 'lively', 'misty', 'muddy', 'old', 'patient', 'proud', 'quiet', 'restless', 'rough', 'shy', 'small', 'snowy', 'solitary', 'sparkling', 'still', 'twilight', 'wandering', 'weathered', 'wild', 'winter'];
const nouns = ['bird', 'breeze', 'brook', 'bush', 'cloud', 'dawn', 'dew', 'dream', 'dust', 'field', 'fire', 'flower', 'fog', 'forest', 'frog', 'glade', 'grass', 'haze', 'hill', 'lake', 'leaf', 'meadow', 'moon', 'night', 'pine', 'rain', 'river', 'sea', 'shadow', 'sky', 'snow', 'star', 'sun', 'surf', 'tree', 'water', 'wave', 'wind'];
function pick<T>(xs: readonly T[]): T {
  return xs[Math.floor(Math.random() * xs.length)]!;
}
function generatedName(): string {
  return `${pick(adjectives)}-${pick(nouns)}-${String(Math.floor(Math.random() * 10_000)).padStart(4, '0')}`;
}

function imageProblem(image: string): string | undefined {
  if (/\s/.test(image)) return 'must not contain whitespace';
  const at = image.indexOf('@');
  if (at >= 0 && !/^sha256:[a-f0-9]{64}$/.test(image.slice(at + 1))) return 'digest must be "sha256:" followed by 64 lowercase hex digits';
  const name = at >= 0 ? image.slice(0, at) : image;
  const lastSlash = name.lastIndexOf('/');
  const colon = name.lastIndexOf(':');
  const repoPart = colon > lastSlash ? name.slice(0, colon) : name;
  const tag = colon > lastSlash ? name.slice(colon + 1) : undefined;
  if (tag !== undefined && !/^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/.test(tag)) return `tag "${tag}" is not valid`;
  const parts = repoPart.split('/');
  const first = parts[0] ?? '';
  const isHost = parts.length > 1 && (first.includes('.') || first.includes(':') || first === 'localhost' || first.startsWith('['));
  for (const p of isHost ? parts.slice(1) : parts) {
    if (!/^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/.test(p)) return `repository part "${p}" must be lowercase letters and digits separated by ".", "_" or "-"`;
  }
  return undefined;
}

function checkImage(image: string): void {
  const problem = imageProblem(image);
  if (problem) throw new TarmacError('invalid_argument', `config.image: ${problem}`);
}

// ---- apps ----

async function createApp(ctx: Ctx): Promise<void> {
  const body = parseInput(createAppSchema, await readJsonBody(ctx.req) ?? {});
  const { catalog } = ctx.deps;
  const p = ctx.principal;
  if (body.app_name !== undefined && body.name !== undefined && body.app_name !== body.name) {
    throw new TarmacError('invalid_argument', `name: "${body.name}" differs from app_name "${body.app_name}"; send one of them`);
  }
  const name = body.app_name ?? body.name;
  if (name === undefined) throw new TarmacError('invalid_argument', 'app_name: required');
  const org = body.org_slug || (p.kind === 'org' ? p.org : 'personal');
  if (!canSeeOrg(p, org)) throw new TarmacError('forbidden', `this token may only create apps in organization "${p.kind === 'org' ? p.org : ''}"`);
  const orgRow = catalog.getOrg(org);
  if (!orgRow) throw new TarmacError('not_found', `organization "${org}" not found`);
  if (catalog.getApp(name)) throw new TarmacError('name_taken', `app name "${name}" is already taken`);
  const app = { name, org_slug: org, network: body.network || 'default', created_at: now() };
  await catalog.createApp(app);
  ctx.log.info({ app: app.name, org }, 'app created');
  sendJson(ctx.res, 201, presentApp(app, orgRow, 0));
}

async function listApps(ctx: Ctx): Promise<void> {
  const { catalog } = ctx.deps;
  const p = ctx.principal;
  let org = ctx.query.get('org_slug') || undefined;
  if (org !== undefined && !canSeeOrg(p, org)) throw new TarmacError('forbidden', `this token may not list apps of organization "${org}"`);
  if (org !== undefined && !catalog.getOrg(org)) throw new TarmacError('not_found', `organization "${org}" not found`);
  if (p.kind === 'org') org = p.org;
  const apps = catalog.listApps(org).map((a) => presentApp(a, catalog.getOrg(a.org_slug), catalog.listMachines({ app: a.name }).length));
  sendJson(ctx.res, 200, { total_apps: apps.length, apps });
}

async function getApp(ctx: Ctx): Promise<void> {
  const { catalog } = ctx.deps;
  const app = visibleApp(catalog, ctx.principal, param(ctx, 'app'));
  sendJson(ctx.res, 200, presentApp(app, catalog.getOrg(app.org_slug), catalog.listMachines({ app: app.name }).length));
}

/**
 * Removes the app with its machines in one transaction; each worker's orchestrator tears down local
 * machines whose spec is gone (a spec delete means destroy). This keeps the catalog free of half-deleted apps.
 */
async function deleteApp(ctx: Ctx): Promise<void> {
  const { catalog } = ctx.deps;
  const app = visibleApp(catalog, ctx.principal, param(ctx, 'app'));
  // Fly asks for stopped machines or `?force=true`; Tarmac always takes the machines down with the app
  // (deliberate: nothing is left half-deleted). `force` is still checked to be a boolean.
  flag(ctx.query, 'force');
  await catalog.deleteApp(app.name, app.org_slug); // the org is checked again on the catalog itself, not this copy
  ctx.log.info({ app: app.name }, 'app deleted');
  ctx.res.writeHead(202, { 'content-length': 0 }).end();
}

// ---- machines ----

async function createMachine(ctx: Ctx): Promise<void> {
  const { catalog } = ctx.deps;
  const app = visibleApp(catalog, ctx.principal, param(ctx, 'app'));
  const body = parseInput(createMachineSchema, await readJsonBody(ctx.req) ?? {});
  checkImage(body.config.image);
  const org = catalog.getOrg(app.org_slug);
  if (!org) throw new Error(`organization ${app.org_slug} of app ${app.name} is missing`);
  const name = body.name ?? generatedName();
  if (catalog.listMachines({ app: app.name }).some((m) => m.spec.name === name && m.spec.desired !== 'destroyed')) {
    throw new TarmacError('name_taken', `machine name "${name}" is already used in app "${app.name}"`);
  }
  const region = body.region ?? ctx.deps.region;
  const host = placeMachine(catalog, region, app.name, demandOf(body.config.guest));
  // Everything is validated: from here on, writes.
  const number = await catalog.allocateMachineNumber(host.id);
  const id = newMachineId();
  const at = now();
  const spec: MachineSpec = {
    id,
    app: app.name,
    name,
    region,
    host_id: host.id,
    config: body.config,
    instance_id: newUlid(),
    version: 1,
    desired: body.skip_launch ? 'stopped' : 'started',
    restart_generation: 0,
    cordoned: body.skip_service_registration === true,
    private_ip: machineAddress(org.network_id, host.host_number, number),
    created_at: at,
    updated_at: at,
  };
  const launched = event(id, 'launch', 'created');
  await catalog.createMachine(spec, [launched]);
  let nonce: string | undefined;
  if (body.lease_ttl !== undefined) {
    nonce = newNonce();
    await catalog.putLease({ machine_id: id, nonce, owner: ctx.principal.name, description: '', expires_at: Math.floor(Date.now() / 1000) + body.lease_ttl, version: newUlid() }, undefined);
  }
  ctx.log.info({ app: app.name, machine_id: id, host_id: host.id, region }, 'machine created');
  // The answer is the machine as created, as Fly's is (state `created`, the launch event), even when a
  // worker on this host has already begun starting it. Its image_ref has no digest yet: the worker
  // resolves the digest when it pulls (Fly resolves it before answering).
  const out = presentMachine({ spec, status: undefined }, [launched]);
  if (nonce) out.nonce = nonce;
  sendJson(ctx.res, 200, out);
}

async function listMachines(ctx: Ctx): Promise<void> {
  const { catalog } = ctx.deps;
  const app = visibleApp(catalog, ctx.principal, param(ctx, 'app'));
  const region = ctx.query.get('region') || undefined;
  const metadata: Record<string, string> = {};
  for (const [k, v] of ctx.query) if (k.startsWith('metadata.') && k.length > 9) metadata[k.slice(9)] = v;
  const machines = catalog.listMachines({
    app: app.name,
    include_deleted: flag(ctx.query, 'include_deleted'),
    ...(region !== undefined ? { region } : {}),
    ...(Object.keys(metadata).length > 0 ? { metadata } : {}),
  });
  sendJson(ctx.res, 200, machines.map((m) => machineJson(ctx.deps, m)));
}

async function getMachine(ctx: Ctx): Promise<void> {
  sendJson(ctx.res, 200, machineJson(ctx.deps, visibleMachine(ctx)));
}

async function updateMachine(ctx: Ctx): Promise<void> {
  const { catalog } = ctx.deps;
  const m = visibleMachine(ctx);
  const body = parseInput(updateMachineSchema, await readJsonBody(ctx.req) ?? {});
  checkImage(body.config.image);
  notDestroyed(m);
  checkLease(ctx, m.spec.id);
  if (body.current_version !== undefined && body.current_version !== m.spec.instance_id) {
    throw new TarmacError('failed_precondition', `current_version ${body.current_version} does not match the machine's version ${m.spec.instance_id}; fetch the machine and retry`);
  }
  if (body.region !== undefined && body.region !== m.spec.region) {
    throw new TarmacError('invalid_argument', `region: a machine cannot move from "${m.spec.region}" to "${body.region}"; create a new machine instead`);
  }
  // Fly documents name as immutable on update; Tarmac allows a rename (deliberate: a superset that a
  // client following the docs never meets), still refusing a name in use.
  const name = body.name ?? m.spec.name;
  if (name !== m.spec.name && catalog.listMachines({ app: m.spec.app }).some((o) => o.spec.name === name && o.spec.desired !== 'destroyed')) {
    throw new TarmacError('name_taken', `machine name "${name}" is already used in app "${m.spec.app}"`);
  }
  const host = catalog.getHost(m.spec.host_id);
  const want = demandOf(body.config.guest);
  if (host && !fits(host, usedOn(catalog, host.id, m.spec.id), want)) {
    throw new TarmacError('no_capacity', `host ${host.id} has no room for ${want.memory_mb} MB and ${body.config.guest?.cpus ?? 1} cpus; choose a smaller guest`);
  }
  const updated = await writeSpec(ctx.deps, m, {
    name,
    config: body.config,
    instance_id: newUlid(),
    version: m.spec.version + 1,
    desired: body.skip_launch ? 'stopped' : 'started',
    cordoned: body.skip_service_registration === true || m.spec.cordoned,
  }, [event(m.spec.id, 'update', 'pending')]);
  ctx.log.info({ machine_id: m.spec.id, version: updated.spec.version }, 'machine updated');
  sendJson(ctx.res, 200, machineJson(ctx.deps, updated));
}

const activeStates: ReadonlySet<MachineState> = new Set(['starting', 'started', 'stopping', 'replacing']);

async function deleteMachine(ctx: Ctx): Promise<void> {
  const m = visibleMachine(ctx);
  const force = flag(ctx.query, 'force') || flag(ctx.query, 'kill');
  checkLease(ctx, m.spec.id);
  if (m.spec.desired === 'destroyed') {
    sendJson(ctx.res, 200, { ok: true });
    return;
  }
  const state = machineState(m);
  const active = activeStates.has(state) || (state === 'created' && m.spec.desired === 'started');
  if (active && !force) {
    throw new TarmacError('failed_precondition', `unable to destroy machine ${m.spec.id}: it is ${state}, not stopped; stop it first or pass force=true`);
  }
  await writeSpec(ctx.deps, m, { desired: 'destroyed' }, [event(m.spec.id, 'destroy', 'pending', { force })]);
  ctx.log.info({ machine_id: m.spec.id, force }, 'machine destroy requested');
  sendJson(ctx.res, 200, { ok: true });
}

async function startMachine(ctx: Ctx): Promise<void> {
  const m = visibleMachine(ctx);
  notDestroyed(m);
  checkLease(ctx, m.spec.id);
  const previous = machineState(m);
  // A new start request bumps restart_generation, so the worker also starts a machine that exited by itself.
  if (m.spec.desired !== 'started' || (previous !== 'started' && previous !== 'starting' && previous !== 'created')) {
    await writeSpec(ctx.deps, m, { desired: 'started', restart_generation: m.spec.restart_generation + 1 }, [event(m.spec.id, 'start', 'pending')]);
  }
  sendJson(ctx.res, 200, { previous_state: previous, migrated: false, new_host: '' });
}

function stopParams(signal: string | undefined, timeoutMs: number | undefined): { stop?: NonNullable<MachineSpec['stop']> } {
  const stop: NonNullable<MachineSpec['stop']> = {};
  if (signal !== undefined) stop.signal = signal;
  if (timeoutMs !== undefined) stop.timeout_ms = Math.round(timeoutMs);
  return signal !== undefined || timeoutMs !== undefined ? { stop } : {};
}

async function stopMachine(ctx: Ctx): Promise<void> {
  const m = visibleMachine(ctx);
  const raw = await readJsonBody(ctx.req) ?? {};
  // Go clients send zero values for what they leave unset: "" for the signal, "0s" for the timeout.
  if (isRecord(raw) && raw['signal'] === '') delete raw['signal'];
  const body = parseInput(stopSchema, raw);
  if (body.id !== undefined && body.id !== '' && body.id !== m.spec.id) {
    throw new TarmacError('invalid_argument', `id: "${body.id}" is not the machine in the path (${m.spec.id})`);
  }
  notDestroyed(m);
  checkLease(ctx, m.spec.id);
  const timeout = body.timeout === 0 ? undefined : body.timeout;
  const change = { desired: 'stopped' as const, ...stopParams(body.signal, timeout) };
  if (m.spec.desired !== 'stopped' || change.stop) {
    await writeSpec(ctx.deps, m, change, [event(m.spec.id, 'stop', 'pending', change.stop ? { ...change.stop } : undefined)]);
  }
  sendJson(ctx.res, 200, { ok: true });
}

async function restartMachine(ctx: Ctx): Promise<void> {
  const m = visibleMachine(ctx);
  const q = {
    ...(ctx.query.get('signal') ? { signal: ctx.query.get('signal') } : {}),
    ...(ctx.query.get('timeout') ? { timeout: /^\d+(\.\d+)?$/.test(ctx.query.get('timeout')!) ? Number(ctx.query.get('timeout')) : ctx.query.get('timeout') } : {}),
  };
  const parsed = parseInput(z.object({ signal: stopConfigSchema.shape.signal, timeout: stopTimeoutSchema.optional() }), q);
  notDestroyed(m);
  checkLease(ctx, m.spec.id);
  const change = { desired: 'started' as const, restart_generation: m.spec.restart_generation + 1, ...stopParams(parsed.signal, parsed.timeout) };
  await writeSpec(ctx.deps, m, change, [event(m.spec.id, 'restart', 'pending')]);
  sendJson(ctx.res, 200, { ok: true });
}

async function signalMachine(ctx: Ctx): Promise<void> {
  const m = visibleMachine(ctx);
  const body = parseInput(signalBodySchema, await readJsonBody(ctx.req) ?? {});
  notDestroyed(m);
  checkLease(ctx, m.spec.id);
  const state = machineState(m);
  if (state !== 'started') throw new TarmacError('failed_precondition', `machine ${m.spec.id} is ${state}, not started; only a started machine can be signalled`);
  const workers = ctx.deps.workers;
  if (!workers) throw new TarmacError('unavailable', 'no worker link is configured on this API server; cannot deliver signals');
  await workers.signal(m.spec.id, body.signal);
  await ctx.deps.catalog.appendEvents([event(m.spec.id, 'signal', body.signal)]);
  sendJson(ctx.res, 200, { ok: true });
}

async function setCordon(ctx: Ctx, cordoned: boolean): Promise<void> {
  const m = visibleMachine(ctx);
  notDestroyed(m);
  checkLease(ctx, m.spec.id);
  if (m.spec.cordoned !== cordoned) {
    await writeSpec(ctx.deps, m, { cordoned }, [event(m.spec.id, cordoned ? 'cordon' : 'uncordon', cordoned ? 'cordoned' : 'uncordoned')]);
  }
  sendJson(ctx.res, 200, { ok: true });
}

async function listEvents(ctx: Ctx): Promise<void> {
  const m = visibleMachine(ctx);
  sendJson(ctx.res, 200, ctx.deps.catalog.listEvents(m.spec.id, 100).map(presentEvent));
}

// ---- metadata ----

const metadataValueSchema = z.strictObject({ value: z.string() });

async function getMetadata(ctx: Ctx): Promise<void> {
  const m = visibleMachine(ctx);
  sendJson(ctx.res, 200, m.spec.config.metadata ?? {});
}

/**
 * Sets or removes one `config.metadata` entry. Like Fly, this changes neither the instance nor the running
 * machine, and takes no lease nonce (fly-go sends none).
 */
async function setMetadata(ctx: Ctx, value: string | undefined): Promise<void> {
  const m = visibleMachine(ctx);
  notDestroyed(m);
  const key = param(ctx, 'key');
  const metadata = { ...m.spec.config.metadata };
  if (value === undefined) delete metadata[key];
  else metadata[key] = value;
  const { metadata: _old, ...rest } = m.spec.config;
  const config = Object.keys(metadata).length > 0 ? { ...rest, metadata } : rest;
  await writeSpec(ctx.deps, m, { config }, []);
  ctx.res.writeHead(204).end();
}

async function putMetadata(ctx: Ctx): Promise<void> {
  const body = parseInput(metadataValueSchema, await readJsonBody(ctx.req) ?? {});
  await setMetadata(ctx, body.value);
}

// ---- wait ----

function parseWaitTimeout(raw: string | null): number {
  if (raw === null || raw === '') return 60_000;
  let ms: number;
  if (/^\d+$/.test(raw)) ms = Number(raw) * 1000;
  else if (durationSchema.safeParse(raw).success) ms = durationMs(raw);
  else throw new TarmacError('invalid_argument', 'timeout: must be a number of seconds between 1 and 300');
  if (ms < 1000 || ms > 300_000) throw new TarmacError('invalid_argument', 'timeout: must be between 1 and 300 seconds');
  return ms;
}

async function waitMachine(ctx: Ctx): Promise<void> {
  const { catalog } = ctx.deps;
  const m = visibleMachine(ctx);
  // fly-go repeats `state` to wait for any of several; a comma-separated list works too.
  const rawStates = ctx.query.getAll('state').flatMap((v) => v.split(',')).map((v) => v.trim()).filter((v) => v !== '');
  if (rawStates.length === 0) rawStates.push('started');
  for (const st of rawStates) {
    if (!(waitStates as readonly string[]).includes(st)) {
      throw new TarmacError('invalid_argument', `state: must be one of ${waitStates.join(', ')} (got "${st}")`);
    }
  }
  const targets = new Set(rawStates as WaitState[]);
  const target = [...targets].join(' or ');
  const wants = (state: MachineState): boolean => targets.has(state) || (targets.has('settled') && settledStates.has(state));
  const timeoutMs = parseWaitTimeout(ctx.query.get('timeout'));
  const id = m.spec.id;
  // `version` is what fly-go sends for the instance; `from_event_id` is accepted and not needed here.
  // Waiting for `started` without an instance means the current instance (so a wait after an update waits for it).
  const instance = ctx.query.get('instance_id') || ctx.query.get('version')
    || (targets.size === 1 && targets.has('started') ? m.spec.instance_id : undefined);

  const check = (): 'reached' | 'gone' | undefined => {
    const cur = catalog.getMachine(id);
    if (!cur) return wants('destroyed') ? 'reached' : 'gone';
    const state = machineState(cur);
    if (wants(state) && (instance === undefined || (cur.status?.instance_id ?? cur.spec.instance_id) === instance)) return 'reached';
    if (state === 'destroyed') return 'gone';
    return undefined;
  };

  const outcome = await new Promise<'reached' | 'gone' | 'timeout' | 'aborted'>((resolve) => {
    let done = false;
    const finish = (r: 'reached' | 'gone' | 'timeout' | 'aborted') => {
      if (done) return;
      done = true;
      unsubscribe();
      clearTimeout(timer);
      ctx.signal.removeEventListener('abort', onAbort);
      resolve(r);
    };
    const unsubscribe = catalog.subscribe((batch) => {
      if (!batch.changes.some((c) => (c.kind === 'machine_status' || c.kind === 'machine_spec') && c.key === id)) return;
      const r = check();
      if (r) finish(r);
    });
    const timer = setTimeout(() => finish('timeout'), timeoutMs);
    const onAbort = () => finish('aborted');
    ctx.signal.addEventListener('abort', onAbort);
    const r = check();
    if (r) finish(r);
  });

  if (outcome === 'reached') {
    sendJson(ctx.res, 200, { ok: true });
    return;
  }
  if (outcome === 'aborted') {
    ctx.res.destroy();
    return;
  }
  const cur = catalog.getMachine(id);
  const state = cur ? machineState(cur) : 'destroyed';
  if (outcome === 'gone') {
    throw new TarmacError('failed_precondition', `machine ${id} was destroyed while waiting for it to be ${target}`);
  }
  throw new TarmacError('timeout', `machine ${id} did not reach state "${target}"${instance ? ` (instance ${instance})` : ''} within ${timeoutMs / 1000}s; it is ${state}`);
}

// ---- leases ----

function liveLease(catalog: Catalog, id: string) {
  const l = catalog.getLease(id);
  return l && l.expires_at > Date.now() / 1000 ? l : undefined;
}

async function getLease(ctx: Ctx): Promise<void> {
  const m = visibleMachine(ctx);
  const lease = liveLease(ctx.deps.catalog, m.spec.id);
  if (!lease) throw new TarmacError('not_found', `machine ${m.spec.id} has no active lease`);
  sendJson(ctx.res, 200, presentLease(lease));
}

async function acquireLease(ctx: Ctx): Promise<void> {
  const { catalog } = ctx.deps;
  const m = visibleMachine(ctx);
  const raw = await readJsonBody(ctx.req) ?? {};
  // fly-go sends the ttl as a query parameter and no body; the docs put it in the body.
  const queryTtl = ctx.query.get('ttl');
  if (queryTtl !== null && isRecord(raw) && raw['ttl'] === undefined) raw['ttl'] = /^\d+$/.test(queryTtl) ? Number(queryTtl) : queryTtl;
  const body = parseInput(leaseSchema, raw);
  notDestroyed(m);
  const header = ctx.req.headers['fly-machine-lease-nonce'];
  const nonceHeader = typeof header === 'string' && header !== '' ? header : undefined;
  const current = liveLease(catalog, m.spec.id);
  if (current && current.nonce !== nonceHeader) {
    throw new TarmacError('lease_held', `machine ${m.spec.id} is already leased by ${current.owner} until ${new Date(current.expires_at * 1000).toISOString()}`);
  }
  const lease = {
    machine_id: m.spec.id,
    // Refreshing a lease you hold keeps its nonce.
    nonce: current ? current.nonce : newNonce(),
    owner: ctx.principal.name,
    description: body.description ?? current?.description ?? '',
    expires_at: Math.floor(Date.now() / 1000) + (body.ttl ?? 30),
    version: newUlid(),
  };
  await catalog.putLease(lease, current ? current.nonce : undefined);
  sendJson(ctx.res, 201, presentLease(lease));
}

async function releaseLease(ctx: Ctx): Promise<void> {
  const m = visibleMachine(ctx);
  const nonce = ctx.req.headers['fly-machine-lease-nonce'];
  if (typeof nonce !== 'string' || nonce === '') {
    throw new TarmacError('invalid_argument', 'fly-machine-lease-nonce header is required to release a lease');
  }
  const lease = ctx.deps.catalog.getLease(m.spec.id);
  if (!lease) throw new TarmacError('not_found', `machine ${m.spec.id} has no lease`);
  await ctx.deps.catalog.deleteLease(m.spec.id, nonce);
  sendJson(ctx.res, 200, { status: 'success', data: { ok: true } });
}

// ---- logs ----

async function appLogs(ctx: Ctx): Promise<void> {
  const { catalog } = ctx.deps;
  const app = visibleApp(catalog, ctx.principal, param(ctx, 'app'));
  const follow = flag(ctx.query, 'follow');
  const only = ctx.query.get('machine_id') || undefined;
  let since: Date | undefined;
  const rawSince = ctx.query.get('since');
  if (rawSince) {
    since = /^\d+$/.test(rawSince) ? new Date(Number(rawSince) * 1000) : new Date(rawSince);
    if (Number.isNaN(since.getTime())) throw new TarmacError('invalid_argument', 'since: must be an ISO date or unix seconds');
  }
  const machines = catalog.listMachines({ app: app.name, include_deleted: true });
  let ids = machines.map((m) => m.spec.id);
  if (only !== undefined) {
    if (!ids.includes(only)) throw new TarmacError('machine_not_found', `machine ${only} not found in app "${app.name}"`);
    ids = [only];
  }
  const workers = ctx.deps.workers;
  if (!workers) throw new TarmacError('unavailable', 'no worker link is configured on this API server; logs are not available');
  const iter = workers.logs(ids, { follow, signal: ctx.signal, ...(since ? { since } : {}) });
  ctx.res.writeHead(200, { 'content-type': 'application/x-ndjson; charset=utf-8', 'cache-control': 'no-store', 'x-content-type-options': 'nosniff' });
  ctx.res.flushHeaders();
  try {
    for await (const entry of iter) {
      if (!ctx.res.write(`${JSON.stringify(entry)}\n`)) {
        await new Promise<void>((resolve) => {
          const done = () => { ctx.res.off('drain', done); ctx.res.off('close', done); resolve(); };
          ctx.res.on('drain', done);
          ctx.res.on('close', done);
        });
      }
      if (ctx.signal.aborted) break;
    }
  } catch (e) {
    if (!ctx.signal.aborted) ctx.log.warn({ err: e }, 'log stream failed');
  }
  ctx.res.end();
}

// ---- the table ----

export const routes: Route[] = [
  { method: 'POST', path: '/v1/apps', handler: createApp },
  { method: 'GET', path: '/v1/apps', handler: listApps },
  { method: 'GET', path: '/v1/apps/:app', handler: getApp },
  { method: 'DELETE', path: '/v1/apps/:app', handler: deleteApp },
  { method: 'GET', path: '/v1/apps/:app/logs', handler: appLogs },
  { method: 'POST', path: '/v1/apps/:app/machines', handler: createMachine },
  { method: 'GET', path: '/v1/apps/:app/machines', handler: listMachines },
  { method: 'GET', path: '/v1/apps/:app/machines/:id', handler: getMachine },
  { method: 'POST', path: '/v1/apps/:app/machines/:id', handler: updateMachine },
  { method: 'DELETE', path: '/v1/apps/:app/machines/:id', handler: deleteMachine },
  { method: 'POST', path: '/v1/apps/:app/machines/:id/start', handler: startMachine },
  { method: 'POST', path: '/v1/apps/:app/machines/:id/stop', handler: stopMachine },
  { method: 'POST', path: '/v1/apps/:app/machines/:id/restart', handler: restartMachine },
  { method: 'POST', path: '/v1/apps/:app/machines/:id/signal', handler: signalMachine },
  { method: 'GET', path: '/v1/apps/:app/machines/:id/wait', handler: waitMachine },
  { method: 'GET', path: '/v1/apps/:app/machines/:id/events', handler: listEvents },
  { method: 'GET', path: '/v1/apps/:app/machines/:id/lease', handler: getLease },
  { method: 'POST', path: '/v1/apps/:app/machines/:id/lease', handler: acquireLease },
  { method: 'DELETE', path: '/v1/apps/:app/machines/:id/lease', handler: releaseLease },
  { method: 'GET', path: '/v1/apps/:app/machines/:id/metadata', handler: getMetadata },
  { method: 'POST', path: '/v1/apps/:app/machines/:id/metadata/:key', handler: putMetadata },
  { method: 'DELETE', path: '/v1/apps/:app/machines/:id/metadata/:key', handler: (ctx) => setMetadata(ctx, undefined) },
  { method: 'POST', path: '/v1/apps/:app/machines/:id/cordon', handler: (ctx) => setCordon(ctx, true) },
  { method: 'POST', path: '/v1/apps/:app/machines/:id/uncordon', handler: (ctx) => setCordon(ctx, false) },
  { method: 'GET', path: '/v1/hosts', handler: listHosts },
  ...certificateRoutes,
  ...ipRoutes,
  ...wireguardRoutes,
];
