// Host configuration: one strict schema for the config file, environment and flags, parsed once and frozen.
import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { parse as parseToml } from 'smol-toml';
import { z } from 'zod';
import { TarmacError } from '../shared/errors.ts';
import { describeIssues } from '../shared/validation.ts';
import { parseUpstream } from '../dns/index.ts';
import { defaultIpPool, parseCidr, type IpPool, type IpRange } from '../shared/ip-pool.ts';

const listen = z.strictObject({
  host: z.string().min(1),
  port: z.number().int().min(0).max(65535),
});

/** Let's Encrypt's production ACME directory. */
const letsEncrypt = 'https://acme-v02.api.letsencrypt.org/directory';

/** Listen hosts that bind every address. */
const wildcard: ReadonlySet<string> = new Set(['0.0.0.0', '::', '[::]', '']);

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
    /** Proxy processes sharing the port (node:cluster); 1 runs it in the host process. Limits are per worker, /metrics merges the workers'; autostart, autostop and app addresses need 1. */
    workers: z.number().int().min(1).max(64).default(1),
    /**
     * What takes the HTTP port: "haproxy" (HAProxy in front, serving the apps it can serve as Tarmac would, the Node
     * proxy behind it for the rest; needs /usr/sbin/haproxy and `workers: 1`) or "node" (the Node proxy alone). Unset:
     * haproxy where it is installed and `workers` is 1, else node.
     */
    engine: z.enum(['node', 'haproxy']).optional(),
    /** Milliseconds without requests after which a machine whose service sets `autostop` is stopped (Fly: a few minutes). */
    autostop_idle_ms: z.number().int().min(100).default(300_000),
    /**
     * Where this host takes backhaul: requests other hosts' edges forward to its machines. Their forwarding headers are
     * trusted, so it must be a specific private address (never a wildcard); other hosts reach it at this address.
     */
    backhaul: listen.refine((l) => !wildcard.has(l.host), 'must be a specific address other hosts reach, not a wildcard')
      .refine((l) => l.port !== 0, 'needs a fixed port: other hosts are told it').optional(),
    /** The HTTPS listener (TLS 1.2/1.3, certificates by SNI, HTTP/2 and HTTP/1.1). Default: see `httpsListen`. */
    https: listen.optional(),
    /**
     * Where app addresses (`tarmac ips allocate-v4/-v6`) come from, as CIDR ranges; the proxy listens on an app's
     * addresses for its service ports other than 80 and 443. IPv6 addresses must be on an interface of the host.
     */
    ip_pool: z.strictObject({
      v4: z.array(z.cidrv4({ error: 'must be an IPv4 CIDR range like 127.0.0.0/16' })).default([...defaultIpPool.v4]),
      v6: z.array(z.cidrv6({ error: 'must be an IPv6 CIDR range like fdaa:ffff::/112' })).default([...defaultIpPool.v6]),
    }).default({ v4: [...defaultIpPool.v4], v6: [...defaultIpPool.v6] }),
  }).refine((p) => p.engine !== 'haproxy' || p.workers === 1, {
    path: ['workers'], message: 'must be 1 with engine "haproxy" (HAProxy uses every core itself; the Node proxy behind it takes what it does not serve)',
  }).default({
    http: { host: '0.0.0.0', port: 8080 }, apps_domain: 'localhost', workers: 1, autostop_idle_ms: 300_000,
    ip_pool: { v4: [...defaultIpPool.v4], v6: [...defaultIpPool.v6] },
  }),
  /** Internal DNS: `.internal` names from the catalog, other names forwarded. Worker hosts also serve machines at [fdaa::3]:53. */
  dns: z.strictObject({
    enabled: z.boolean().default(true),
    /** Who answers: "unbound" (driven by Tarmac; the default where /usr/sbin/unbound exists) or "node" (Tarmac's own server). */
    engine: z.enum(['unbound', 'node']).optional(),
    /** The operator's listener (UDP and TCP). */
    listen: listen.default({ host: '127.0.0.1', port: 5353 }),
    /** Resolvers for other names ("1.1.1.1", "10.0.0.2:53", "[::1]:53"); empty: the nameservers of /etc/resolv.conf. */
    upstreams: z.array(z.string().refine(isUpstream, 'must be an address like 1.1.1.1, 10.0.0.2:53 or [::1]:53')).default([]),
    /** Sources (addresses or CIDR ranges) that see every org's names; machines see their own org's, others are refused. */
    trusted: z.array(z.union([z.cidrv4(), z.cidrv6(), z.ipv4(), z.ipv6()], { error: 'must be an address or CIDR range like 127.0.0.0/8 or ::1/128' })).default(['127.0.0.0/8', '::1/128']),
  }).default({ enabled: true, listen: { host: '127.0.0.1', port: 5353 }, upstreams: [], trusted: ['127.0.0.0/8', '::1/128'] }),
  /**
   * The WireGuard mesh that carries each organization's private network between hosts (docs/mesh.md). Off by default:
   * one host needs none; turn it on for every host of a fleet on etcd.
   */
  mesh: z.strictObject({
    enabled: z.boolean().default(false),
    /** UDP port of this host's WireGuard listener. */
    listen_port: z.number().int().min(1).max(65535).default(51820),
    /** `ip:port` other hosts send WireGuard packets to (default: the API host and listen_port). */
    endpoint: z.string().regex(/^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:.]+\]):\d{1,5}$/, 'must be IP:PORT or [IPv6]:PORT').optional(),
  }).default({ enabled: false, listen_port: 51820 }),
  /**
   * ACME certificates (`tarmac certs request`): a host with it on takes orders for host names that ask for one and
   * renews them; every proxy answers the challenges, whichever host runs the order. Off by default.
   */
  acme: z.strictObject({
    enabled: z.boolean().default(false),
    /** The ACME directory: Let's Encrypt's by default; its staging one, or a test server such as pebble, for trials. */
    directory: z.url({ protocol: /^https?$/, error: 'must be an http(s) URL of an ACME directory' }).default(letsEncrypt),
    /** Contact address registered with the ACME account. */
    email: z.email().optional(),
    /** PEM file of a CA trusted for the directory's HTTPS besides the system roots (a private or test CA, e.g. pebble's). */
    ca_file: z.string().min(1).optional(),
    /** Challenge types to use, most preferred first (both are answered by every proxy: ports 80 and 443 must reach it). */
    challenges: z.array(z.enum(['tls-alpn-01', 'http-01'])).min(1).default(['tls-alpn-01', 'http-01']),
    /** Renew a certificate when fewer days than this are left. */
    renew_before_days: z.number().int().min(1).max(60).default(30),
    /** How often certificates are checked for renewal and failed orders retried. */
    check_interval_seconds: z.number().int().min(1).default(3600),
  }).default({ enabled: false, directory: letsEncrypt, challenges: ['tls-alpn-01', 'http-01'], renew_before_days: 30, check_interval_seconds: 3600 }),
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

function isUpstream(value: string): boolean {
  try {
    parseUpstream(value);
    return true;
  } catch {
    return false;
  }
}

export type HostConfig = Readonly<z.infer<typeof hostConfigSchema>>;

/** The HTTPS listener: `proxy.https`, else port 8443 on the HTTP listener's host (an ephemeral port when HTTP's is). */
export function httpsListen(proxy: HostConfig['proxy']): { host: string; port: number } {
  return proxy.https ?? { host: proxy.http.host, port: proxy.http.port === 0 ? 0 : 8443 };
}
export type HostConfigInput = z.input<typeof hostConfigSchema>;

/** Where other hosts reach this host's WireGuard listener: `mesh.endpoint`, else the API host (when other hosts can reach it). */
export function meshEndpoint(config: HostConfig): string {
  if (config.mesh.endpoint) return config.mesh.endpoint;
  const host = config.api.host;
  if (wildcard.has(host) || host === 'localhost' || host.startsWith('127.') || host === '::1') {
    throw new TarmacError('invalid_argument', `mesh.endpoint: set the address other hosts reach this host's WireGuard port at (the API listens on ${host})`);
  }
  return `${host.includes(':') ? `[${host}]` : host}:${config.mesh.listen_port}`;
}

/** The configured address pool, parsed (the schema checked every range). */
export function ipPoolOf(proxy: HostConfig['proxy']): IpPool {
  const ranges = (cidrs: readonly string[]) => cidrs.map((c) => parseCidr(c) as IpRange);
  return { v4: ranges(proxy.ip_pool.v4), v6: ranges(proxy.ip_pool.v6) };
}

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
