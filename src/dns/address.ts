// Address helpers for the DNS server: IPv6 groups, the organization network in a private address, trusted source lists.
import { BlockList, isIP } from 'node:net';
import { TarmacError } from '../shared/errors.ts';

/** The eight 16-bit groups of an IPv6 address (IPv4-mapped tails included), or undefined if it is not one. */
export function ipv6Groups(address: string): number[] | undefined {
  if (isIP(address) !== 6) return undefined;
  let a = address.toLowerCase();
  const pct = a.indexOf('%');
  if (pct >= 0) a = a.slice(0, pct);
  const v4 = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(a);
  if (v4) {
    const [b0, b1, b2, b3] = v4.slice(1).map(Number) as [number, number, number, number];
    a = `${a.slice(0, v4.index)}${((b0 << 8) | b1).toString(16)}:${((b2 << 8) | b3).toString(16)}`;
  }
  const [head, tail] = a.split('::') as [string, string | undefined];
  const h = head === '' ? [] : head.split(':');
  const t = tail === undefined || tail === '' ? [] : tail.split(':');
  const zeros = tail === undefined ? [] : new Array<string>(8 - h.length - t.length).fill('0');
  return [...h, ...zeros, ...t].map((g) => parseInt(g, 16));
}

/** A canonical spelling of an IPv6 address (eight groups, no compression), for comparing addresses spelled differently. */
export function ipv6Key(address: string): string | undefined {
  return ipv6Groups(address)?.map((g) => g.toString(16)).join(':');
}

/** The 32-bit network (organization) number of a private fdaa: address, or undefined for any other address. */
export function privateNetwork(address: string): number | undefined {
  if (!address.startsWith('fdaa:')) return undefined;
  const g = ipv6Groups(address);
  return g ? networkOf(g) : undefined;
}

/** The network number held in the groups of a private fdaa: address (its second and third groups). */
const networkOf = (g: number[]) => ((g[1]! << 16) | g[2]!) >>> 0;

/** A set of CIDR ranges ("127.0.0.0/8", "::1/128", or a bare address) that source addresses are checked against. */
export function sourceList(cidrs: readonly string[]): (address: string) => boolean {
  const list = new BlockList();
  for (const c of cidrs) {
    const [net, bits] = c.split('/') as [string, string | undefined];
    const family = isIP(net);
    const prefix = bits === undefined ? (family === 6 ? 128 : 32) : Number(bits);
    if (family === 0 || !Number.isInteger(prefix) || prefix < 0 || prefix > (family === 6 ? 128 : 32)) {
      throw new TarmacError('invalid_argument', `dns.trusted: "${c}" is not an address or CIDR range like 127.0.0.0/8 or ::1/128`);
    }
    list.addSubnet(net, prefix, family === 6 ? 'ipv6' : 'ipv4');
  }
  return (address) => {
    const mapped = address.startsWith('::ffff:') && address.includes('.') ? address.slice(7) : address;
    const family = isIP(mapped);
    return family !== 0 && list.check(mapped, family === 6 ? 'ipv6' : 'ipv4');
  };
}

/**
 * The network (organization) number of the private /48 that the range `cidr` ("fdaa:0:2::/64", or a bare address) lies
 * in entirely, or undefined when it is not inside one fdaa: /48 (other addresses, or a range wider than a /48).
 */
export function privateNetworkOfRange(cidr: string): number | undefined {
  const [net, bits] = cidr.split('/') as [string, string | undefined];
  const g = ipv6Groups(net);
  const prefix = bits === undefined ? 128 : Number(bits);
  if (!g || g[0] !== 0xfdaa || !Number.isInteger(prefix) || prefix < 48 || prefix > 128) return undefined;
  return networkOf(g);
}
