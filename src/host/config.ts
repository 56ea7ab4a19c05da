// Host configuration: one strict schema for the config file, environment and flags, parsed once and frozen.
import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { parse as parseToml } from 'smol-toml';
import { z } from 'zod';
import { TarmacError } from '../shared/errors.ts';
import { describeIssues } from '../shared/validation.ts';

const listen = z.strictObject({
  host: z.string().min(1),
  port: z.number().int().min(0).max(65535),
});

export const hostConfigSchema = z.strictObject({
  /** Where the catalog, images, machines and the admin token live. */
  data_dir: z.string().min(1).default('./.tarmac'),
  /** Stable host id; generated on first start and kept in the data dir when absent. */
  host_id: z.string().regex(/^[a-z0-9-]{1,40}$/).optional(),
  /** "sqlite" (the embedded catalog, one host) or "etcd://h1:2379,h2:2379" (a fleet; each host mirrors it locally). */
  catalog: z.string().regex(/^(sqlite|etcd:\/\/[^\s,]+(,[^\s,]+)*)$/, 'must be "sqlite" or "etcd://host:port[,host:port…]"').default('sqlite'),
  /** Seconds a host stays in the catalog after it stops renewing its registration (etcd lease). */
  host_ttl_seconds: z.number().int().min(2).max(300).default(10),
  region: z.string().regex(/^[a-z0-9-]{2,20}$/, 'must be a short lowercase region name like "local" or "fra"').default('local'),
  roles: z.array(z.enum(['edge', 'worker', 'api'])).min(1).default(['edge', 'worker', 'api']),
  api: listen.default({ host: '127.0.0.1', port: 4280 }),
  proxy: z.strictObject({
    http: listen.default({ host: '0.0.0.0', port: 8080 }),
    apps_domain: z.string().regex(/^[a-z0-9.-]+$/).default('localhost'),
    /** Proxy processes sharing the port (node:cluster); 1 runs it in the host process. Limits and metrics are per worker. */
    workers: z.number().int().min(1).max(64).default(1),
  }).default({ http: { host: '0.0.0.0', port: 8080 }, apps_domain: 'localhost', workers: 1 }),
  /** Prometheus /metrics of this host (proxy, …). Bound to loopback by default: it names apps and machines. */
  metrics: listen.default({ host: '127.0.0.1', port: 9480 }),
  runtime: z.strictObject({
    /** Default driver for machines; a machine can pick another with metadata tarmac_runtime. */
    default: z.enum(['runc', 'crun', 'runsc']).default('runc'),
    /** Binary of the OCI runtime used by the "runc" driver (runc, or crun where it works). */
    oci_binary: z.string().default('runc'),
  }).default({ default: 'runc', oci_binary: 'runc' }),
  capacity: z.strictObject({
    /** Schedulable cores (shared guest cpus take 1/16 of a core each, like Fly's). 0: the host's cores. */
    cpus: z.number().int().min(0).default(0),
    /** Schedulable guest memory in MB. 0: the host's memory. */
    memory_mb: z.number().int().min(0).default(0),
  }).default({ cpus: 0, memory_mb: 0 }),
  /** Registries reached over plain HTTP besides loopback ones. */
  insecure_registries: z.array(z.string()).default([]),
  /** Install missing system packages with apt-get when running as root. */
  install_packages: z.boolean().default(true),
  log_level: z.enum(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent']).default('info'),
});

export type HostConfig = Readonly<z.infer<typeof hostConfigSchema>>;
export type HostConfigInput = z.input<typeof hostConfigSchema>;

/** Parses and freezes a config; data_dir is made absolute. Every bad key is named in one message. */
export function parseHostConfig(input: unknown, source = 'config'): HostConfig {
  const r = hostConfigSchema.safeParse(input, { reportInput: true });
  if (!r.success) throw new TarmacError('invalid_argument', `invalid ${source}: ${describeIssues(r.error)}`);
  return Object.freeze({ ...r.data, data_dir: resolve(r.data.data_dir) });
}

/** Reads a TOML config file (see config.example.toml). */
export async function readConfigFile(path: string): Promise<HostConfigInput> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new TarmacError('invalid_argument', `cannot read config file ${path}: ${(e as Error).message}`, { cause: e });
  }
  try {
    return parseToml(text) as HostConfigInput;
  } catch (e) {
    throw new TarmacError('invalid_argument', `config file ${path} is not valid TOML: ${(e as Error).message}`, { cause: e });
  }
}

/** Parses "host:port", "[v6]:port" or ":port" for listen flags. */
export function parseListen(value: string, flag: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(value);
  const port = Number(m?.[3]);
  if (!m || !Number.isInteger(port) || port > 65535) throw new TarmacError('invalid_argument', `${flag}: expected HOST:PORT, got "${value}"`);
  return { host: m[1] ?? (m[2] || '0.0.0.0'), port };
}
