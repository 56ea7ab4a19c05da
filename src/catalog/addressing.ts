// Private IPv6 addresses like Fly's 6PN: fdaa + 32-bit network (org) + 32-bit host + 32-bit machine.

function hex16(n: number): string {
  return (n & 0xffff).toString(16);
}

/** The /48-style prefix of an organization's network: fdaa:NNNN:NNNN. */
export function networkPrefix(network: number): string {
  return `fdaa:${hex16(network >>> 16)}:${hex16(network)}`;
}

/** The prefix of an organization's network, fdaa:NNNN:NNNN::/48. */
export function networkCidr(network: number): string {
  return `${networkPrefix(network)}::/48`;
}

/** A machine's private address: fdaa:NNNN:NNNN:HHHH:HHHH:MMMM:MMMM:2 (a /112 per machine). */
export function machineAddress(network: number, host: number, machine: number): string {
  return `${networkPrefix(network)}:${hex16(host >>> 16)}:${hex16(host)}:${hex16(machine >>> 16)}:${hex16(machine)}:2`;
}

/** Where machines find the DNS server, as on Fly: an address of every host, reached from each machine's namespace. */
export const privateDnsAddress = 'fdaa::3';
