// When a host name's ACME state asks for an order: first issuance, renewal near expiry, a stale or failed attempt.
import type { Certificate } from '../catalog/index.ts';

/** How eagerly orders are (re)started. */
export interface AcmePolicy {
  /**
   * Renew an issued certificate when less than this is left before it expires (Let's Encrypt advises 30 days), or
   * less than a third of its lifetime for short-lived ones (so a 6-day certificate is not renewed over and over).
   */
  renewBeforeMs: number;
  /** A pending order whose host has not written for this long is taken over (that host stopped or crashed). */
  staleMs: number;
  /** A failed order is tried again after this long. */
  retryMs: number;
}

/** 30 days before expiry, take over after 10 minutes, retry failures hourly. */
export const defaultAcmePolicy: AcmePolicy = { renewBeforeMs: 30 * 86_400_000, staleMs: 10 * 60_000, retryMs: 60 * 60_000 };

/** True when a certificate row needs an ACME order started now (rows without ACME state never do). */
export function acmeDue(cert: Certificate, now: number, policy: AcmePolicy): boolean {
  const a = cert.acme;
  if (a === undefined) return false;
  const since = now - Date.parse(a.updated_at);
  switch (a.status) {
    case 'pending': return a.host_id === undefined || !(since < policy.staleMs);
    case 'failed': return !(since < policy.retryMs);
    case 'issued': {
      const notAfter = Date.parse(cert.not_after);
      const window = Math.min(policy.renewBeforeMs, (notAfter - Date.parse(cert.not_before)) / 3);
      return !(notAfter - now > window);
    }
  }
}
