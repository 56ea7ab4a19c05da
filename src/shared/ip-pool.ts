// Address pools for app IPs: CIDR ranges parsed once, canonical address text, and the first free address of a pool.
import { isIPv4, isIPv6 } from 'node:net';

/** One CIDR range of a pool, as numbers (IPv4 in the low 32 bits). */
export interface IpRange {
  readonly family: 4 | 6;
  readonly first: bigint;
  readonly last: bigint;
  /** The range as configured, for messages. */
  readonly cidr: string;
}

/** The pools app addresses come from: IPv4 and IPv6 ranges (either may be empty: that type is not offered). */
export interface IpPool {
  readonly v4: readonly IpRange[];
  readonly v6: readonly IpRange[];
}

/** On one host: loopback addresses 127.0.x.y; no IPv6 (it needs addresses added to `lo`, see the README). */
export const defaultIpPool = { v4: ['127.0.0.0/16'], v6: [] as string[] } as const;

/** Addresses never handed out: the host's own loopback address and Debian's address of the host name. */
const reserved: ReadonlySet<string> = new Set(['127.0.0.1', '127.0.1.1']);

/** The address as a number; undefined when `ip` is not an IPv4 or IPv6 address. */
export function ipToBigInt(ip: string): { family: 4 | 6; value: bigint } | undefined {
  if (isIPv4(ip)) return { family: 4, value: ip.split('.').reduce((n, o) => (n << 8n) | BigInt(Number(o)), 0n) };
  if (!isIPv6(ip) || ip.includes('%')) return undefined;
  let text = ip;
  const v4tail = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (v4tail) {
    const n = ipToBigInt(v4tail[1]!)!.value;
    text = `${text.slice(0, v4tail.index)}${(n >> 16n).toString(16)}:${(n & 0xffffn).toString(16)}`;
  }
  const [head, tail] = text.split('::') as [string, string | undefined];
  const groups = (s: string | undefined) => (s === undefined || s === '' ? [] : s.split(':'));
  const h = groups(head);
  const t = groups(tail);
  const all = tail === undefined ? h : [...h, ...Array<string>(8 - h.length - t.length).fill('0'), ...t];
  return { family: 6, value: all.reduce((n, g) => (n << 16n) | BigInt(parseInt(g, 16)), 0n) };
}

/** The canonical text of an address number (IPv6 compressed and lowercase, as RFC 5952 and the URL parser write it). */
export function bigIntToIp(family: 4 | 6, value: bigint): string {
  if (family === 4) return [24n, 16n, 8n, 0n].map((s) => String((value >> s) & 0xffn)).join('.');
  const groups: string[] = [];
  for (let s = 112n; s >= 0n; s -= 16n) groups.push(((value >> s) & 0xffffn).toString(16));
  return new URL(`http://[${groups.join(':')}]/`).hostname.slice(1, -1);
}

/** The canonical text of an address; undefined when it is not one. */
export function canonicalIp(ip: string): string | undefined {
  const n = ipToBigInt(ip);
  return n === undefined ? undefined : bigIntToIp(n.family, n.value);
}

/** Parses `a.b.c.d/len` or `v6::/len`; a message saying what is wrong otherwise. */
export function parseCidr(cidr: string): IpRange | string {
  const m = /^([^/]+)\/(\d{1,3})$/.exec(cidr);
  const base = m ? ipToBigInt(m[1]!) : undefined;
  if (!m || !base) return `"${cidr}" is not a CIDR range like "127.0.0.0/16" or "fdaa:ffff::/112"`;
  const bits = base.family === 4 ? 32 : 128;
  const len = Number(m[2]);
  if (len > bits) return `"${cidr}": the prefix length must be at most ${bits}`;
  const size = 1n << BigInt(bits - len);
  const first = base.value & ~(size - 1n) & ((1n << BigInt(bits)) - 1n);
  return { family: base.family, first, last: first + size - 1n, cidr };
}

/**
 * The first address of `ranges` that `taken` does not hold, skipping each range's first and last address (network
 * and broadcast in IPv4, the subnet-router anycast in IPv6) and the reserved loopback ones; undefined when none is free.
 */
export function firstFreeIp(ranges: readonly IpRange[], taken: (ip: string) => boolean): string | undefined {
  for (const r of ranges) {
    const from = r.last - r.first >= 2n ? r.first + 1n : r.first;
    const to = r.last - r.first >= 2n ? r.last - 1n : r.last;
    for (let n = from; n <= to; n++) {
      const ip = bigIntToIp(r.family, n);
      if (!reserved.has(ip) && !taken(ip)) return ip;
    }
  }
  return undefined;
}
