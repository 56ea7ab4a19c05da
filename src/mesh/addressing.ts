// Mesh addressing, like Fly's 6PN rewrite: a per-host "wire" prefix carries every organization's traffic between hosts.
//
// A machine's address puts its organization first: fdaa:NNNN:NNNN:HHHH:HHHH:MMMM:MMMM:2. Between hosts the same address
// travels with the host first, fdaa:HHHH:HHHH:NNNN:NNNN:MMMM:MMMM:2 (swapping the two 32-bit fields, a permutation of
// 16-bit words, so TCP/UDP checksums stay valid), so each host owns one /48 and WireGuard's AllowedIPs hold one prefix
// per host however many organizations there are. Host numbers have the top bit set and network numbers do not, so a
// host's wire prefix never equals an organization's prefix.

/** Lowest host number the mesh accepts (the top bit marks host-first "wire" addresses). */
export const MIN_MESH_HOST_NUMBER = 0x8000_0000;

/** True for a host number that can own a wire prefix. */
export function isMeshHostNumber(n: number): boolean {
  return Number.isInteger(n) && n >= MIN_MESH_HOST_NUMBER && n <= 0xffff_ffff;
}

function groups(n: number): string {
  return `${(n >>> 16).toString(16)}:${(n & 0xffff).toString(16)}`;
}

/** The host's wire prefix, fdaa:HHHH:HHHH::/48: the AllowedIPs of its peer entry on every other host. */
export function hostWirePrefix(hostNumber: number): string {
  return `fdaa:${groups(hostNumber)}::/48`;
}

/** The host's own address in the mesh (host-to-host traffic, e.g. a benchmark), fdaa:HHHH:HHHH::1. */
export function hostMeshAddress(hostNumber: number): string {
  return `fdaa:${groups(hostNumber)}::1`;
}


/** 32-bit host number as an nftables hex constant. */
export function nftHex(n: number): string {
  return `0x${n.toString(16).padStart(8, '0')}`;
}
