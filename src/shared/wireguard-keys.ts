// WireGuard key pairs (Curve25519, base64 as `wg genkey`/`wg pubkey` print them), made with node:crypto.
import { createPrivateKey, createPublicKey, randomBytes } from 'node:crypto';

/** DER prefix of a PKCS#8 X25519 private key; the 32 raw key bytes follow it. */
const PKCS8_X25519 = Buffer.from('302e020100300506032b656e04220420', 'hex');

export interface WireguardKeyPair {
  privateKey: string;
  publicKey: string;
}

/** A new key pair; the private key is clamped as `wg genkey` clamps it. */
export function newWireguardKeyPair(): WireguardKeyPair {
  const raw = randomBytes(32);
  raw[0] = raw[0]! & 248;
  raw[31] = (raw[31]! & 127) | 64;
  const privateKey = raw.toString('base64');
  return { privateKey, publicKey: wireguardPublicKey(privateKey) };
}

/** The public key of a base64 private key (what `wg pubkey` prints). Throws on anything but 32 bytes of base64. */
export function wireguardPublicKey(privateKey: string): string {
  const raw = Buffer.from(privateKey, 'base64');
  if (raw.length !== 32 || raw.toString('base64') !== privateKey) throw new Error('a WireGuard private key is 32 bytes of base64');
  const key = createPrivateKey({ key: Buffer.concat([PKCS8_X25519, raw]), format: 'der', type: 'pkcs8' });
  return Buffer.from(createPublicKey(key).export({ format: 'jwk' }).x!, 'base64url').toString('base64');
}

/** True for a base64 WireGuard key (32 bytes). */
export function isWireguardKey(key: string): boolean {
  return /^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$/.test(key);
}
