// zod schemas of the catalog rows, for values read back from the distributed store (input at the edge).
import { z } from 'zod';
import { machineConfigSchema } from './machine-config.ts';
import { machineStates } from './types.ts';
import type { ApiToken, App, Host, Lease, MachineEvent, MachineSpec, MachineStatus, Org } from './types.ts';

const timestamp = z.string();

export const orgSchema = z.strictObject({
  slug: z.string().min(1),
  name: z.string(),
  network_id: z.number().int().nonnegative(),
  created_at: timestamp,
});

export const tokenSchema = z.strictObject({
  hash: z.string().min(1),
  org_slug: z.string().min(1),
  role: z.enum(['admin', 'org']),
  name: z.string(),
  created_at: timestamp,
});

export const appSchema = z.strictObject({
  name: z.string().min(1),
  org_slug: z.string().min(1),
  network: z.string(),
  created_at: timestamp,
});

export const machineSpecSchema = z.strictObject({
  id: z.string().min(1),
  app: z.string().min(1),
  name: z.string(),
  region: z.string(),
  host_id: z.string(),
  config: machineConfigSchema,
  instance_id: z.string(),
  version: z.number().int(),
  desired: z.enum(['started', 'stopped', 'destroyed']),
  restart_generation: z.number().int(),
  stop: z.strictObject({ signal: z.string().optional(), timeout_ms: z.number().optional() }).optional(),
  cordoned: z.boolean(),
  private_ip: z.string(),
  created_at: timestamp,
  updated_at: timestamp,
});

const imageRefSchema = z.strictObject({
  registry: z.string(),
  repository: z.string(),
  tag: z.string(),
  digest: z.string(),
  labels: z.record(z.string(), z.string()),
});

const exitEventSchema = z.strictObject({
  exit_code: z.number().int(),
  oom_killed: z.boolean(),
  requested_stop: z.boolean(),
  restarting: z.boolean(),
  signal: z.number().int(),
  exited_at: timestamp,
});

export const machineStatusSchema = z.strictObject({
  id: z.string().min(1),
  app: z.string().min(1),
  state: z.enum(machineStates),
  instance_id: z.string(),
  image_ref: imageRefSchema.optional(),
  restarts: z.number().int(),
  restart_generation: z.number().int(),
  last_exit: exitEventSchema.optional(),
  updated_at: timestamp,
});

export const machineEventSchema = z.strictObject({
  id: z.string().min(1),
  machine_id: z.string().min(1),
  type: z.enum(['launch', 'start', 'stop', 'exit', 'restart', 'update', 'destroy', 'pull', 'failed', 'cordon', 'uncordon', 'signal']),
  status: z.string(),
  source: z.enum(['user', 'flyd']),
  timestamp: z.number(),
  request: z.record(z.string(), z.unknown()).optional(),
});

export const leaseSchema = z.strictObject({
  machine_id: z.string().min(1),
  nonce: z.string(),
  owner: z.string(),
  description: z.string(),
  expires_at: z.number(),
  version: z.string(),
});

export const hostSchema = z.strictObject({
  id: z.string().min(1),
  region: z.string(),
  roles: z.array(z.enum(['edge', 'worker', 'api'])),
  host_number: z.number().int().nonnegative(),
  cpus: z.number().nonnegative(),
  memory_mb: z.number().nonnegative(),
  address: z.string(),
  updated_at: timestamp,
});

// Compile-time checks that each schema names exactly the fields of its row type.
type Fits<S extends z.ZodType, T> = [keyof z.output<S>] extends [keyof T] ? ([keyof T] extends [keyof z.output<S>] ? true : never) : never;
const fits: [
  Fits<typeof orgSchema, Org>, Fits<typeof tokenSchema, ApiToken>, Fits<typeof appSchema, App>,
  Fits<typeof machineSpecSchema, MachineSpec>, Fits<typeof machineStatusSchema, MachineStatus>,
  Fits<typeof machineEventSchema, MachineEvent>, Fits<typeof leaseSchema, Lease>, Fits<typeof hostSchema, Host>,
] = [true, true, true, true, true, true, true, true];
void fits;
