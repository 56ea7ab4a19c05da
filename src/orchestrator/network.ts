// Machine networking: one named network namespace per machine, a veth pair, its private IPv6 /128 routed from the host, and the host firewall that confines machines.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { access, mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { privateDnsAddress } from '../catalog/index.ts';
import { TarmacError } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';

export interface MachineNetwork {
  /** Path of the machine's network namespace, for the driver. */
  netnsPath: string;
  /** Host side of the veth pair. */
  hostIf: string;
  /** The machine's IPv6 address (no prefix length). */
  address: string;
}

const NETNS_DIR = '/var/run/netns';
const NS_PREFIX = 'tm-';
/** Link-local address of the host side: the machine's default gateway. */
const GATEWAY = 'fe80::1';
/** One file per configured namespace (tmpfs, gone on reboot like the namespaces): its content is the address. */
const READY_DIR = '/run/tarmac/netns';

/** Name of machine `id`'s network namespace: `tm-` and the first 12 characters of the id. */
export function netnsName(id: string): string {
  return NS_PREFIX + id.slice(0, 12);
}

/** Host interface name for machine `id`: `tmv` + 10 hex of a hash of the namespace stem (Linux names are at most 15 chars). */
export function hostIfName(id: string): string {
  return 'tmv' + createHash('sha256').update(id.slice(0, 12)).digest('hex').slice(0, 10);
}

/** Runs `ip [args] -batch -` with `lines` on stdin; resolves with stderr, rejects on a non-zero exit unless `force`. */
function ipBatch(args: string[], lines: string[], force = false): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('ip', [...(force ? ['-force'] : []), ...args, '-batch', '-'], { stdio: ['pipe', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code === 0 || force) resolve(stderr);
      else reject(new Error(`ip ${args.join(' ')} -batch failed (${code}): ${stderr.trim()}`));
    });
    child.stdin.end(lines.join('\n') + '\n');
  });
}

/** The nftables table (inet: IPv4 and IPv6) that confines machines; one per host, shared by every machine. */
export const FIREWALL_TABLE = 'tarmac';
/** The set in FIREWALL_TABLE of (source, destination) prefix pairs machines may exchange traffic between (the mesh fills it). */
export const NETWORKS_SET = 'networks';

/**
 * The host firewall as one `nft -f` script that replaces the table atomically (so it is idempotent). It matches only
 * machine interfaces (`tmv*`), so it holds no per-machine state and is harmless on a host with no machine:
 * - prerouting: machines speak IPv6 only, so IPv4 from them is dropped; a source address the host would not route
 *   back through the interface it came in on (reverse-path check) is spoofed and dropped before conntrack sees it;
 * - input: a machine reaches the host itself only with replies to connections the host opened (the proxy's), and
 *   neighbour discovery, and DNS queries to the host's resolver address (fdaa::3, UDP and TCP port 53); anything else
 *   it sends to any host address (fe80::1, global addresses, any other port) is refused
 *   (TCP with a reset, the rest with an ICMP error, so the machine's connect fails at once instead of timing out);
 * - forward: a machine reaches, through the host, only addresses of its own organization's network on another machine
 *   interface or the WireGuard mesh (`tmw*`), as the set `networks` (pairs `fdaa:N::/48 . fdaa:N::/48`, filled by the
 *   mesh, or without it by the host's local networks, src/mesh/local.ts) allows; nothing reaches a machine through the host except from such a pair on the same
 *   interfaces. Anything else a machine sends through the host (the underlay, other networks) is refused.
 */
export function firewallRuleset(): string {
  const machines = 'iifname "tmv*"';
  return [
    `table inet ${FIREWALL_TABLE}`,
    `delete table inet ${FIREWALL_TABLE}`,
    `table inet ${FIREWALL_TABLE} {`,
    '  chain prerouting {',
    '    type filter hook prerouting priority raw; policy accept;',
    `    ${machines} meta nfproto ipv4 drop`,
    `    ${machines} fib saddr . iif oif missing drop`,
    '  }',
    '  chain input {',
    '    type filter hook input priority filter; policy accept;',
    `    ${machines} ct state established,related accept`,
    `    ${machines} ip6 daddr ${privateDnsAddress} meta l4proto { udp, tcp } th dport 53 accept`,
    `    ${machines} icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept`,
    `    ${machines} meta l4proto ipv6-icmp drop`,
    // A reset fails a connect at once (an ICMP error only after a SYN retransmit, about a second).
    `    ${machines} meta l4proto tcp reject with tcp reset`,
    `    ${machines} reject with icmpx admin-prohibited`,
    '  }',
    `  set ${NETWORKS_SET} { type ipv6_addr . ipv6_addr; flags interval; }`,
    '  chain forward {',
    '    type filter hook forward priority filter; policy accept;',
    // (nft 1.0.6 cannot put wildcard names in an anonymous set: one rule per interface kind.)
    `    ${machines} oifname "tmv*" ip6 saddr . ip6 daddr @${NETWORKS_SET} accept`,
    `    ${machines} oifname "tmw*" ip6 saddr . ip6 daddr @${NETWORKS_SET} accept`,
    `    iifname "tmw*" oifname "tmv*" ip6 saddr . ip6 daddr @${NETWORKS_SET} accept`,
    `    ${machines} meta l4proto tcp reject with tcp reset`,
    `    ${machines} reject with icmpx admin-prohibited`,
    '    oifname "tmv*" meta l4proto tcp reject with tcp reset',
    '    oifname "tmv*" reject with icmpx admin-prohibited',
    '  }',
    '}',
    '',
  ].join('\n');
}

/** Runs `nft -f -` with `script` on stdin (in network namespace `netns` when given). */
export function nftApply(script: string, opts: { netns?: string } = {}): Promise<void> {
  const [cmd, args] = opts.netns ? ['nsenter', [`--net=${opts.netns}`, 'nft', '-f', '-']] : ['nft', ['-f', '-']];
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', (e: NodeJS.ErrnoException) => {
      reject(e.code === 'ENOENT'
        ? new TarmacError('failed_precondition', 'nft is not installed: apt-get install nftables (Tarmac needs it to keep machines from reaching the host and each other)', { cause: e })
        : e);
    });
    child.on('close', (code) => {
      if (code === 0) resolve();
      else reject(new Error(`nft -f failed (${code}): ${stderr.trim()}`));
    });
    child.stdin.end(script);
  });
}

let firewall: Promise<void> | undefined;

/**
 * Installs the host firewall (firewallRuleset) and the machines' resolver address (fdaa::3/128 on lo, where the DNS
 * server listens) once per process: the first machine network set up in this process waits for them, later ones find
 * them done. Both outlive the process, like the machines they serve.
 */
export function ensureHostFirewall(): Promise<void> {
  firewall ??= Promise.all([
    nftApply(firewallRuleset()),
    ipBatch([], [`addr replace ${privateDnsAddress}/128 dev lo nodad`]),
  ]).then(() => {}).catch((e: unknown) => {
    firewall = undefined;
    if (e instanceof TarmacError) throw e;
    throw new TarmacError('internal', `could not install the host firewall (nftables table inet ${FIREWALL_TABLE}): ${(e as Error).message}`, { cause: e });
  });
  return firewall;
}

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}

async function linkExists(name: string): Promise<boolean> {
  return exists(`/sys/class/net/${name}`);
}

/**
 * Creates (or reuses) machine `id`'s namespace with `address`/128 on its eth0, a default route via the host side
 * (fe80::1), and a host route to `address` through the host side of the veth pair. Two `ip` processes in all (and,
 * once per process, one `nft` for the host firewall).
 */
export async function setupMachineNetwork(id: string, address: string, opts: { log?: Logger } = {}): Promise<MachineNetwork> {
  const ns = netnsName(id);
  const hostIf = hostIfName(id);
  const netnsPath = `${NETNS_DIR}/${ns}`;
  if (!/^[0-9a-fA-F:]+$/.test(address)) throw new TarmacError('invalid_argument', `machine address ${JSON.stringify(address)} is not an IPv6 address`);
  // Machines never run unconfined: the firewall is in place before setup returns (in parallel with it the first time).
  const fw = ensureHostFirewall();
  const haveNs = await exists(netnsPath);
  const haveIf = await linkExists(hostIf);
  if (haveNs && !haveIf) {
    // A namespace without its veth is a leftover of an interrupted set-up: start again.
    await ipBatch([], [`netns del ${ns}`], true);
  }
  const reuse = haveNs && haveIf;
  const ready = `${READY_DIR}/${ns}`;
  if (reuse && (await readFile(ready, 'utf8').catch(() => '')) === address) {
    // Set up before (a stopped machine starting again): nothing to do, no process to spawn.
    await Promise.all([fw, forwardFrom(hostIf)]);
    return { netnsPath, hostIf, address };
  }
  try {
    // `replace` keeps a re-run on an existing namespace idempotent.
    const create = [
      `netns add ${ns}`,
      `link add ${hostIf} type veth peer name eth0 netns ${ns}`,
      `link set ${hostIf} up`,
      `addr add ${GATEWAY}/64 dev ${hostIf} nodad`,
    ];
    await Promise.all([fw, ipBatch([], [...(reuse ? [] : create), `route replace ${address}/128 dev ${hostIf}`])]);
    await forwardFrom(hostIf);
    await ipBatch(['-n', ns], [
      'link set lo up',
      'link set eth0 up',
      `addr replace ${address}/128 dev eth0 nodad`,
      `route replace default via ${GATEWAY} dev eth0`,
    ]);
  } catch (e) {
    if (!reuse) await teardownMachineNetwork(id).catch(() => {});
    if (e instanceof TarmacError) throw e;
    throw new TarmacError('internal', `could not set up the network of machine ${id}: ${(e as Error).message}`, { cause: e });
  }
  await mkdir(READY_DIR, { recursive: true });
  await writeFile(ready, address);
  opts.log?.debug({ id, ns, hostIf, address, reused: reuse }, 'machine network ready');
  return { netnsPath, hostIf, address };
}

/**
 * Lets the host forward IPv6 that arrives from the machine on `hostIf` (to machines of its org on this host, or the
 * mesh; the firewall decides what may pass) without turning forwarding on for the whole host, where the kernel can
 * (`force_forwarding`, Linux 6.17+). Elsewhere the host's local networks turn IPv6 forwarding on host-wide instead.
 */
async function forwardFrom(hostIf: string): Promise<void> {
  await writeFile(`/proc/sys/net/ipv6/conf/${hostIf}/force_forwarding`, '1').catch((e: NodeJS.ErrnoException) => {
    if (e.code !== 'ENOENT') throw e;
  });
}

/** Deletes machine `id`'s veth pair, host route and namespace. Idempotent. */
export async function teardownMachineNetwork(id: string): Promise<void> {
  const ns = netnsName(id);
  const hostIf = hostIfName(id);
  await rm(`${READY_DIR}/${ns}`, { force: true });
  const lines: string[] = [];
  if (await linkExists(hostIf)) lines.push(`link del ${hostIf}`);
  if (await exists(`${NETNS_DIR}/${ns}`)) lines.push(`netns del ${ns}`);
  if (lines.length === 0) return;
  await ipBatch([], lines, true);
  if ((await linkExists(hostIf)) || (await exists(`${NETNS_DIR}/${ns}`))) {
    throw new TarmacError('internal', `could not remove the network of machine ${id} (namespace ${ns}, interface ${hostIf})`);
  }
}

/** Id stems (the part after `tm-`) of every machine namespace on this host, for cleaning up leftovers. */
export async function listMachineNetworks(): Promise<string[]> {
  const names = await readdir(NETNS_DIR).catch(() => [] as string[]);
  return names.filter((n) => n.startsWith(NS_PREFIX)).map((n) => n.slice(NS_PREFIX.length));
}
