// zod schemas of the catalog rows, for values read back from the distributed store (input at the edge).
import { z } from 'zod';
import { machineConfigSchema } from './machine-config.ts';
import { machineStates } from './types.ts';
import type { ApiToken, App, Certificate, Host, IpAssignment, Lease, MachineEvent, MachineSpec, MachineStatus, Org } from './types.ts';

const timestamp = z.string();

export const orgSchema = z.strictObject({
  slug: z.string().min(1),
  name: z.string(),
  network_id: z.number().int().nonnegative(),
  wireguard_peers: z.array(z.strictObject({
    name: z.string().min(1), public_key: z.string(), address: z.string(), gateway: z.string(), created_at: timestamp,
  })).optional(),
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
  checks: z.array(z.strictObject({
    name: z.string(),
    status: z.enum(['passing', 'warning', 'critical']),
    output: z.string(),
    updated_at: timestamp,
  })).optional(),
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
  backhaul: z.string().optional(),
  mesh: z.strictObject({ public_key: z.string(), endpoint: z.string(), prefixes: z.array(z.string()) }).optional(),
  updated_at: timestamp,
});

const acmeChallengeSchema = z.strictObject({
  type: z.enum(['http-01', 'tls-alpn-01']),
  token: z.string().min(1),
  key_authorization: z.string().min(1),
});

export const certificateSchema = z.strictObject({
  hostname: z.string().min(1),
  app: z.string().min(1),
  source: z.enum(['custom', 'self-signed', 'acme']),
  fullchain: z.string(),
  private_key: z.string(),
  issuer: z.string(),
  subject: z.string(),
  not_before: timestamp,
  not_after: timestamp,
  fingerprint_sha256: z.string(),
  created_at: timestamp,
  acme: z.strictObject({
    status: z.enum(['pending', 'issued', 'failed']),
    host_id: z.string().min(1).optional(),
    challenges: z.array(acmeChallengeSchema),
    error: z.string().optional(),
    updated_at: timestamp,
  }).optional(),
}).refine((c) => (c.fullchain !== '' && c.private_key !== '') || c.acme !== undefined, 'fullchain and private_key are empty only while ACME issues the first certificate');

export const ipAssignmentSchema = z.strictObject({
  ip: z.string().min(2),
  app: z.string().min(1),
  type: z.enum(['v4', 'v6']),
  region: z.string(),
  created_at: timestamp,
});

// Compile-time checks that each schema names exactly the fields of its row type.
type Fits<S extends z.ZodType, T> = [keyof z.output<S>] extends [keyof T] ? ([keyof T] extends [keyof z.output<S>] ? true : never) : never;
const fits: [
  Fits<typeof orgSchema, Org>, Fits<typeof tokenSchema, ApiToken>, Fits<typeof appSchema, App>,
  Fits<typeof machineSpecSchema, MachineSpec>, Fits<typeof machineStatusSchema, MachineStatus>,
  Fits<typeof machineEventSchema, MachineEvent>, Fits<typeof leaseSchema, Lease>, Fits<typeof hostSchema, Host>,
  Fits<typeof certificateSchema, Certificate>, Fits<typeof ipAssignmentSchema, IpAssignment>,
] = [true, true, true, true, true, true, true, true, true, true];
void fits;
