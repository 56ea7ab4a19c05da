// PROXY protocol headers (HAProxy's v1 text and v2 binary), sent to a machine before a client's bytes so it sees who connected.
import { isIP, isIPv4 } from 'node:net';
import { ipToBigInt } from '../shared/ip-pool.ts';
import type { ProxyProtoVersion } from './ports.ts';

/** One end of a connection: its address (IPv4, IPv6 or IPv4-mapped IPv6) and port. */
export interface Endpoint {
  readonly address: string;
  readonly port: number;
}

/** The v2 signature: `\r\n\r\n\0\r\nQUIT\n`. */
export const proxyV2Signature = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);

/** `::ffff:1.2.3.4` as `1.2.3.4`; other addresses as they are. */
function unmapped(address: string): string {
  return address.toLowerCase().startsWith('::ffff:') && isIPv4(address.slice(7)) ? address.slice(7) : address;
}

/** The 16 bytes of an IPv6 address (IPv4 as IPv4-mapped). */
function ipv6Bytes(address: string): Buffer {
  const n = ipToBigInt(isIPv4(address) ? `::ffff:${address}` : address)!.value;
  const out = Buffer.alloc(16);
  out.writeBigUInt64BE(n >> 64n, 0);
  out.writeBigUInt64BE(n & 0xffff_ffff_ffff_ffffn, 8);
  return out;
}

/**
 * The PROXY header for a connection from `source` to `destination` (the address and port the client connected to).
 * Both ends are given in one family: IPv4 when both are IPv4 (mapped ones included), else IPv6. `udp` marks a
 * datagram flow (v2 only; v1 has no UDP and says UNKNOWN).
 */
export function proxyHeader(version: ProxyProtoVersion, source: Endpoint, destination: Endpoint, udp = false): Buffer {
  const src = unmapped(source.address);
  const dst = unmapped(destination.address);
  const v4 = isIPv4(src) && isIPv4(dst);
  const known = isIP(src) !== 0 && isIP(dst) !== 0;
  if (version === 'v1') {
    if (!known || udp) return Buffer.from('PROXY UNKNOWN\r\n', 'latin1');
    const s = v4 ? src : isIPv4(src) ? `::ffff:${src}` : src;
    const d = v4 ? dst : isIPv4(dst) ? `::ffff:${dst}` : dst;
    return Buffer.from(`PROXY ${v4 ? 'TCP4' : 'TCP6'} ${s} ${d} ${source.port} ${destination.port}\r\n`, 'latin1');
  }
  if (!known) {
    // LOCAL command, no addresses: the machine treats it as a direct connection.
    return Buffer.concat([proxyV2Signature, Buffer.from([0x20, 0x00, 0x00, 0x00])]);
  }
  const addrLen = v4 ? 12 : 36;
  const out = Buffer.alloc(16 + addrLen);
  proxyV2Signature.copy(out, 0);
  out[12] = 0x21; // version 2, PROXY
  out[13] = (v4 ? 0x10 : 0x20) | (udp ? 0x02 : 0x01); // AF_INET/AF_INET6 | STREAM/DGRAM
  out.writeUInt16BE(addrLen, 14);
  if (v4) {
    Buffer.from(src.split('.').map(Number)).copy(out, 16);
    Buffer.from(dst.split('.').map(Number)).copy(out, 20);
    out.writeUInt16BE(source.port, 24);
    out.writeUInt16BE(destination.port, 26);
  } else {
    ipv6Bytes(src).copy(out, 16);
    ipv6Bytes(dst).copy(out, 32);
    out.writeUInt16BE(source.port, 48);
    out.writeUInt16BE(destination.port, 50);
  }
  return out;
}
