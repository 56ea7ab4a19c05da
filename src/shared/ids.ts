// Identifiers in Fly's shapes: 14-hex machine ids, ULID instance ids, random tokens.
import { randomBytes, createHash } from 'node:crypto';
import { monotonicFactory } from 'ulid';

const nextUlid = monotonicFactory();

/** A machine id like Fly's: 14 lowercase hex characters. */
export function newMachineId(): string {
  return randomBytes(7).toString('hex');
}

export const machineIdPattern = /^[0-9a-f]{14}$/;

/** A ULID (26 Crockford base32 characters), used for instance ids and event ids. */
export function newUlid(): string {
  return nextUlid();
}

/** A secret bearer token; only its sha256 is stored. */
export function newToken(prefix = 'tm'): string {
  return `${prefix}_${randomBytes(24).toString('base64url')}`;
}

export function hashToken(token: string): string {
  return createHash('sha256').update(token).digest('hex');
}

/** A nonce for machine leases. */
export function newNonce(): string {
  return randomBytes(16).toString('hex');
}
