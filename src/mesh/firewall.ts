// The mesh's nftables rules: address rewriting between machine and wire form, what the WireGuard interface lets in, and
// the "same network" pairs of the machines' firewall, all in one `nft -f` batch.
import { networkCidr } from '../catalog/index.ts';
import { hostMeshAddress, nftHex } from './addressing.ts';

/** The mesh's own table (inet); the machines' firewall table is another, named by the host. */
export const MESH_TABLE = 'tarmac_mesh';

/** An operator's WireGuard peer on this host: its address, inside organization network `network`. */
export interface OperatorRoute {
  address: string;
  network: number;
}

export interface MeshRulesetInput {
  ifname: string;
  hostNumber: number;
  /** The machines' firewall: its table (inet) and the set of allowed (source . destination) pairs to fill. */
  firewall: { table: string; set: string };
  /** Organization network numbers (each may reach itself). */
  networks: readonly number[];
  operators: readonly OperatorRoute[];
  /** Where machines and operators find the DNS server (fdaa::3). */
  dnsAddress: string;
}

// Raw IPv6 header offsets (bits) of the two 32-bit fields of each address: [fdaa][field 1][field 2][machine][2].
const SRC1 = '@nh,80,32';
const SRC2 = '@nh,112,32';
const DST1 = '@nh,208,32';
const DST2 = '@nh,240,32';
/** Top bit of the first field: set in wire form (a host number), clear in machine form (a network number). */
const SRC_WIRE = '@nh,80,1';
const DST_WIRE = '@nh,208,1';

/**
 * Leaving through the mesh to another host: machine form → wire form, for packets from this host's addresses (its
 * machines, its operators) to another host's. The saddr's host field (known: ours) is the scratch space for the swap.
 */
function toWire(me: string): string {
  return `${SRC_WIRE} 0 ${SRC2} ${me} ${DST_WIRE} 0 ${DST2} != ${me} ` +
    `${SRC2} set ${DST1} ${DST1} set ${DST2} ${DST2} set ${SRC2} ${SRC2} set ${SRC1} ${SRC1} set ${me}`;
}

/** Arriving from the mesh for one of this host's addresses: wire form → machine form; the daddr's host field (ours) is scratch. */
function fromWire(me: string): string {
  return `${SRC_WIRE} 1 ${SRC2} != 0 ${DST1} ${me} ${DST2} != 0 ` +
    `${DST1} set ${SRC1} ${SRC1} set ${SRC2} ${SRC2} set ${DST1} ${DST1} set ${DST2} ${DST2} set ${me}`;
}

/**
 * The nft lines that make the machines' "same network" set hold exactly one pair per organization network (each
 * reaches itself), replacing what it held; they create the table and set if the host firewall is not there yet.
 */
export function networkPairsScript(firewall: { table: string; set: string }, networks: readonly number[]): string[] {
  const pairs = [...new Set(networks)].filter((n) => n > 0).sort((a, b) => a - b).map((n) => `${networkCidr(n)} . ${networkCidr(n)}`);
  return [
    `add table inet ${firewall.table}`,
    `add set inet ${firewall.table} ${firewall.set} { type ipv6_addr . ipv6_addr; flags interval; }`,
    `flush set inet ${firewall.table} ${firewall.set}`,
    ...(pairs.length ? [`add element inet ${firewall.table} ${firewall.set} { ${pairs.join(', ')} }`] : []),
  ];
}

function elements(pairs: string[]): string {
  return pairs.length ? ` elements = { ${pairs.join(', ')} }` : '';
}

/**
 * The whole mesh firewall as one script that replaces the mesh table and the machines' allowed pairs atomically:
 * - prerouting (before conntrack) / postrouting: the wire-form rewrite (see addressing.ts), so conntrack and the
 *   firewall only ever see machine-form addresses;
 * - input from the mesh: other hosts' own addresses (wire form, network field 0: WireGuard proved which host sent
 *   them), an operator's DNS queries to fdaa::3, replies; everything else is refused (machines of other hosts never
 *   reach this host's ports);
 * - forward from the mesh: to machines (the machines' firewall checks the network), between an operator and its
 *   network; anything else (the underlay, other networks) is refused, as is anything but machines entering the mesh.
 */
export function meshRuleset(input: MeshRulesetInput): string {
  const { ifname, firewall } = input;
  const me = nftHex(input.hostNumber);
  const w = `"${ifname}"`;
  const operatorPairs = input.operators.flatMap((o) => [
    `${o.address}/128 . ${networkCidr(o.network)}`, `${networkCidr(o.network)} . ${o.address}/128`, `${o.address}/128 . ${input.dnsAddress}/128`,
  ]);
  return [
    ...networkPairsScript(firewall, input.networks),
    `table inet ${MESH_TABLE}`,
    `delete table inet ${MESH_TABLE}`,
    `table inet ${MESH_TABLE} {`,
    `  set operators { type ipv6_addr . ipv6_addr; flags interval;${elements(operatorPairs)} }`,
    '  chain prerouting {',
    '    type filter hook prerouting priority raw; policy accept;',
    `    iifname ${w} ${fromWire(me)}`,
    '  }',
    '  chain input {',
    '    type filter hook input priority filter; policy accept;',
    `    iifname ${w} ct state established,related accept`,
    `    iifname ${w} ${SRC_WIRE} 1 ${SRC2} 0 ip6 daddr ${hostMeshAddress(input.hostNumber)} accept`,
    `    iifname ${w} ip6 saddr . ip6 daddr @operators meta l4proto { udp, tcp } th dport 53 accept`,
    `    iifname ${w} meta l4proto tcp reject with tcp reset`,
    `    iifname ${w} reject with icmpx admin-prohibited`,
    '  }',
    '  chain forward {',
    '    type filter hook forward priority filter; policy accept;',
    `    iifname ${w} oifname "tmv*" accept`,
    `    iifname ${w} oifname ${w} ip6 saddr . ip6 daddr @operators accept`,
    `    iifname ${w} meta l4proto tcp reject with tcp reset`,
    `    iifname ${w} reject with icmpx admin-prohibited`,
    `    oifname ${w} iifname != "tmv*" reject with icmpx admin-prohibited`,
    '  }',
    '  chain postrouting {',
    '    type filter hook postrouting priority srcnat; policy accept;',
    `    oifname ${w} ${toWire(me)}`,
    '  }',
    '}',
    '',
  ].join('\n');
}
