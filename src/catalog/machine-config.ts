// The Machines API v1 machine config, as a zod schema: Fly's field names, strict where Tarmac acts on a field.
import { z } from 'zod';

/** Go-style duration ("500ms", "10s", "1m30s") or a number of nanoseconds, as Fly accepts. */
export const durationSchema = z.union([
  z.string().regex(/^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$/, 'must be a duration like "10s" or "500ms"'),
  z.number().int().nonnegative(),
]);
export type Duration = z.infer<typeof durationSchema>;

/** Milliseconds of a duration value (numbers are nanoseconds, as in Go's time.Duration). */
export function durationMs(d: Duration): number {
  if (typeof d === 'number') return d / 1e6;
  const unit: Record<string, number> = { ns: 1e-6, us: 1e-3, 'µs': 1e-3, ms: 1, s: 1000, m: 60_000, h: 3_600_000 };
  let total = 0;
  for (const m of d.matchAll(/(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)/g)) total += Number(m[1]) * (unit[m[2]!] ?? 0);
  return total;
}

const port = z.number().int().min(1).max(65535);
/** Fields of Fly's schema that Tarmac keeps but does not act on yet: any JSON value. */
const kept = z.unknown();
const stringMap = z.record(z.string(), z.string());

export const checkSchema = z.strictObject({
  type: z.enum(['tcp', 'http']).optional(),
  port: port.optional(),
  interval: durationSchema.optional(),
  timeout: durationSchema.optional(),
  grace_period: durationSchema.optional(),
  method: z.string().optional(),
  path: z.string().optional(),
  protocol: z.enum(['http', 'https']).optional(),
  tls_skip_verify: z.boolean().optional(),
  tls_server_name: z.string().optional(),
  headers: z.array(z.strictObject({ name: z.string(), values: z.array(z.string()) })).optional(),
  kind: z.enum(['informational', 'readiness']).optional(),
});

export const portSchema = z.strictObject({
  port: port.optional(),
  start_port: port.optional(),
  end_port: port.optional(),
  handlers: z.array(z.enum(['http', 'tls', 'proxy_proto', 'pg_tls', 'edge_http'])).optional(),
  force_https: z.boolean().optional(),
  // Fly's http_options; `h2_backend` makes the proxy speak h2c (HTTP/2 without TLS) to the machine, as gRPC needs.
  http_options: z.looseObject({ h2_backend: z.boolean().optional() }).optional(),
  tls_options: kept.optional(),
  // Fly's PROXY protocol version for a `proxy_proto` port (v1 when absent).
  proxy_proto_options: z.looseObject({ version: z.enum(['v1', 'v2']).optional() }).optional(),
});

export const concurrencySchema = z.strictObject({
  type: z.enum(['connections', 'requests']).optional(),
  soft_limit: z.number().int().min(0).optional(),
  hard_limit: z.number().int().min(0).optional(),
});

export const serviceSchema = z.strictObject({
  protocol: z.enum(['tcp', 'udp']),
  internal_port: port,
  ports: z.array(portSchema).optional(),
  concurrency: concurrencySchema.optional(),
  autostart: z.boolean().optional(),
  autostop: z.union([z.boolean(), z.enum(['off', 'stop', 'suspend'])]).optional(),
  min_machines_running: z.number().int().min(0).optional(),
  checks: z.array(checkSchema).optional(),
  force_instance_key: kept.optional(),
  force_instance_description: kept.optional(),
});

export const guestSchema = z.strictObject({
  cpu_kind: z.enum(['shared', 'performance']).optional(),
  cpus: z.number().int().min(1).max(64).optional(),
  memory_mb: z.number().int().min(16).max(262144).optional(),
  gpus: kept.optional(),
  gpu_kind: kept.optional(),
  host_dedication_id: kept.optional(),
  kernel_args: kept.optional(),
  persist_rootfs: kept.optional(),
  max_memory_mb: kept.optional(),
});

export const initSchema = z.strictObject({
  cmd: z.array(z.string()).optional(),
  entrypoint: z.array(z.string()).optional(),
  exec: z.array(z.string()).optional(),
  kernel_args: kept.optional(),
  swap_size_mb: kept.optional(),
  tty: z.boolean().optional(),
});

export const restartSchema = z.strictObject({
  policy: z.enum(['no', 'always', 'on-failure', 'spot-price']).optional(),
  max_retries: z.number().int().min(0).optional(),
  gpu_bid_price: kept.optional(),
});

export const stopConfigSchema = z.strictObject({
  signal: z.enum(['SIGABRT', 'SIGALRM', 'SIGFPE', 'SIGHUP', 'SIGILL', 'SIGINT', 'SIGKILL', 'SIGPIPE', 'SIGQUIT', 'SIGSEGV', 'SIGTERM', 'SIGTRAP', 'SIGUSR1', 'SIGUSR2']).optional(),
  timeout: durationSchema.optional(),
});

const envName = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'must be a valid environment variable name');

export const machineConfigSchema = z.strictObject({
  image: z.string().min(1).max(512),
  env: z.record(envName, z.string()).optional(),
  init: initSchema.optional(),
  guest: guestSchema.optional(),
  services: z.array(serviceSchema).optional(),
  checks: z.record(z.string(), checkSchema).optional(),
  restart: restartSchema.optional(),
  auto_destroy: z.boolean().optional(),
  metadata: stringMap.optional(),
  stop_config: stopConfigSchema.optional(),
  // Fly schema fields kept as given, not acted on yet.
  containers: kept.optional(),
  dns: kept.optional(),
  files: kept.optional(),
  metrics: kept.optional(),
  mounts: kept.optional(),
  processes: kept.optional(),
  schedule: kept.optional(),
  size: kept.optional(),
  standbys: kept.optional(),
  statics: kept.optional(),
  volumes: kept.optional(),
  disable_machine_autostart: kept.optional(),
  rootfs: kept.optional(),
  cache_drive: kept.optional(),
  spot: kept.optional(),
});

export type MachineConfig = z.infer<typeof machineConfigSchema>;
export type MachineService = z.infer<typeof serviceSchema>;
export type MachineCheck = z.infer<typeof checkSchema>;
export type RestartConfig = z.infer<typeof restartSchema>;
export type StopConfig = z.infer<typeof stopConfigSchema>;
export type GuestConfig = z.infer<typeof guestSchema>;

/** Defaults Fly applies when `guest` is left out. */
export const defaultGuest = { cpu_kind: 'shared', cpus: 1, memory_mb: 256 } as const;

/** A health check of a machine config with the name Fly gives it and the port it probes. */
export interface NamedCheck {
  /** The key under top-level `checks`, or `servicecheck-NN-<type>-<port>` for `services[].checks` (NN counts them all). */
  name: string;
  check: MachineCheck;
  type: 'tcp' | 'http';
  /** The check's port; a service check without one probes the service's internal_port. Undefined: nothing to probe. */
  port: number | undefined;
  /** Index in `services` for a service check; undefined for a top-level one. */
  service: number | undefined;
}

/** Every health check of a config, top-level ones first. A check without `type` is http when it has a `path`, else tcp. */
export function namedChecks(config: MachineConfig): NamedCheck[] {
  const out: NamedCheck[] = [];
  const typeOf = (c: MachineCheck) => c.type ?? (c.path !== undefined ? 'http' : 'tcp');
  for (const [name, check] of Object.entries(config.checks ?? {})) out.push({ name, check, type: typeOf(check), port: check.port, service: undefined });
  let n = 0;
  (config.services ?? []).forEach((s, service) => {
    for (const check of s.checks ?? []) {
      const port = check.port ?? s.internal_port;
      out.push({ name: `servicecheck-${String(n++).padStart(2, '0')}-${typeOf(check)}-${port}`, check, type: typeOf(check), port, service });
    }
  });
  return out;
}
