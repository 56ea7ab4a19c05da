// `tarmac certs`: certificates of an app's host names shown as a table and as details (the API never returns keys).
import type { CertificateResponse } from '../client/index.ts';
import { ago, paint, table, type Style } from './format.ts';

/** "in 89d", "expired 3d ago": how long a certificate has left ("-" while ACME issues the first one). */
function expiry(notAfter: string, now: number): string {
  if (notAfter === '') return '-';
  const left = Date.parse(notAfter) - now;
  if (left <= 0) return `expired ${ago(notAfter, now)}`;
  const days = Math.floor(left / 86_400_000);
  return days >= 1 ? `in ${days}d` : `in ${Math.ceil(left / 3_600_000)}h`;
}

export function certsTable(certs: readonly CertificateResponse[], style: Style, now = Date.now()): string {
  return table(
    ['hostname', 'source', 'issuer', 'expires', 'status', 'added'],
    certs.map((c) => [c.hostname, c.source, c.issuer, expiry(c.not_after, now), c.status, ago(c.created_at, now)]),
    style,
  );
}

export function certDetails(c: CertificateResponse, style: Style, now = Date.now()): string {
  const rows: Array<[string, string]> = [
    ['Hostname', c.hostname],
    ['App', c.app],
    ['Source', c.source],
    ['Status', c.acme_requested ? `${c.status} (ACME)` : c.status],
    ...(c.error !== undefined ? [['Error', c.error] as [string, string]] : []),
    ['Subject', c.subject],
    ['Issuer', c.issuer],
    ['Valid from', c.not_before],
    ['Valid until', c.not_after === '' ? '-' : `${c.not_after} (${expiry(c.not_after, now)})`],
    ['SHA-256', c.fingerprint_sha256],
    ['Chain', `${(c.fullchain.match(/BEGIN CERTIFICATE/g) ?? []).length} certificate(s)`],
  ];
  const width = Math.max(...rows.map(([k]) => k.length));
  return rows.map(([k, v]) => `${paint(style, 'bold', k.padEnd(width))}  ${v}`).join('\n') + '\n';
}
