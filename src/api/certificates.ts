// Certificates API: custom PEM certificates and ACME requests per host name of an app (add, request, list, show, remove); keys go in, never out.
import { z } from 'zod';
import { certificateFromPem, certificateHostnamePattern, isCertificateProblem, type Certificate, type CertificateAcme } from '../catalog/index.ts';
import type { CertificateResponse } from '../client/index.ts';
import { TarmacError } from '../shared/errors.ts';
import { parseInput } from '../shared/validation.ts';
import { visibleApp } from './auth.ts';
import { readJsonBody, sendJson } from './http.ts';
import type { Ctx, Route } from './routes.ts';

/** Longest PEM accepted for a chain or a key (a chain of a few RSA-4096 certificates fits easily). */
const maxPemChars = 64 * 1024;

const hostname = z.string().max(253).transform((s) => s.toLowerCase().replace(/\.$/, ''))
  .refine((s) => certificateHostnamePattern.test(s), 'must be a DNS name like "www.example.com" or "*.example.com"');

const addCustomSchema = z.strictObject({
  hostname,
  fullchain: z.string().min(1).max(maxPemChars),
  private_key: z.string().min(1).max(maxPemChars),
});

const requestAcmeSchema = z.strictObject({
  hostname: hostname.refine((s) => !s.startsWith('*.'), 'cannot be a wildcard: HTTP-01 and TLS-ALPN-01 prove one name at a time (ask for each name)'),
});

/**
 * Refuses a host name under the apps domain other than the app's own `<app>.<domain>`: the proxy routes those names to
 * apps by name, so a certificate for another app's name (or the domain itself, or a wildcard over it) would put this
 * app's certificate, and key, in front of traffic that is not its own.
 */
function checkAppsDomain(name: string, app: string, domain: string): void {
  const bare = name.startsWith('*.') ? name.slice(2) : name;
  const under = bare === domain || bare.endsWith(`.${domain}`);
  if (!under || name === `${app}.${domain}`) return;
  throw new TarmacError('invalid_argument', `hostname: "${name}" is in the apps domain "${domain}", whose names belong to the apps they name; ` +
    `app "${app}" may only use "${app}.${domain}" there`);
}

/** A certificate without its key; `status` is its ACME state, or `issued` for an uploaded one. */
function presentCertificate(c: Certificate): CertificateResponse {
  return {
    hostname: c.hostname, app: c.app, source: c.source, status: c.acme?.status ?? 'issued', acme_requested: c.acme !== undefined,
    ...(c.acme?.error !== undefined ? { error: c.acme.error } : {}),
    issuer: c.issuer, subject: c.subject, not_before: c.not_before,
    not_after: c.not_after, fingerprint_sha256: c.fingerprint_sha256, fullchain: c.fullchain, created_at: c.created_at,
  };
}

/** The app's certificate of the `:hostname` path parameter; 404 when the app or that certificate of it is not there. */
function visibleCertificate(ctx: Ctx): Certificate {
  const app = visibleApp(ctx.deps.catalog, ctx.principal, ctx.params['app'] ?? '');
  const name = (ctx.params['hostname'] ?? '').toLowerCase();
  const cert = ctx.deps.catalog.getCertificate(name);
  if (!cert || cert.app !== app.name) throw new TarmacError('not_found', `app "${app.name}" has no certificate for host name "${name}"`);
  return cert;
}

async function addCustom(ctx: Ctx): Promise<void> {
  const app = visibleApp(ctx.deps.catalog, ctx.principal, ctx.params['app'] ?? '');
  const body = parseInput(addCustomSchema, await readJsonBody(ctx.req) ?? {});
  checkAppsDomain(body.hostname, app.name, ctx.deps.appsDomain);
  const cert = certificateFromPem({ ...body, app: app.name, source: 'custom' });
  if (isCertificateProblem(cert)) throw new TarmacError('invalid_argument', `${cert.field}: ${cert.message}`);
  await ctx.deps.catalog.putCertificate(cert);
  ctx.log.info({ app: app.name, hostname: cert.hostname, not_after: cert.not_after }, 'certificate added');
  sendJson(ctx.res, 201, presentCertificate(cert));
}

/**
 * Asks for an ACME certificate: marks the host name's row `pending` (kept certificate, if any, serves meanwhile) for a
 * host with ACME on to take. A request while one is pending joins it; two racing requests: one gets a conflict.
 */
async function requestAcme(ctx: Ctx): Promise<void> {
  const app = visibleApp(ctx.deps.catalog, ctx.principal, ctx.params['app'] ?? '');
  const { hostname: name } = parseInput(requestAcmeSchema, await readJsonBody(ctx.req) ?? {});
  checkAppsDomain(name, app.name, ctx.deps.appsDomain);
  const held = ctx.deps.catalog.getCertificate(name);
  if (held && held.app !== app.name) throw new TarmacError('name_taken', `host name "${name}" already has a certificate in another app`);
  if (held?.acme?.status === 'pending') {
    sendJson(ctx.res, 202, presentCertificate(held));
    return;
  }
  const now = new Date().toISOString();
  const acme: CertificateAcme = { status: 'pending', challenges: [], updated_at: now };
  const row: Certificate = held ? { ...held, acme } : {
    hostname: name, app: app.name, source: 'acme', fullchain: '', private_key: '', issuer: '', subject: '', not_before: '', not_after: '',
    fingerprint_sha256: '', created_at: now, acme,
  };
  await ctx.deps.catalog.putCertificate(row, { expect: held });
  ctx.log.info({ app: app.name, hostname: name }, 'ACME certificate requested');
  sendJson(ctx.res, 202, presentCertificate(row));
}

async function list(ctx: Ctx): Promise<void> {
  const app = visibleApp(ctx.deps.catalog, ctx.principal, ctx.params['app'] ?? '');
  const certificates = ctx.deps.catalog.listCertificates(app.name).map(presentCertificate);
  sendJson(ctx.res, 200, { total_certificates: certificates.length, certificates });
}

async function show(ctx: Ctx): Promise<void> {
  sendJson(ctx.res, 200, presentCertificate(visibleCertificate(ctx)));
}

async function remove(ctx: Ctx): Promise<void> {
  const cert = visibleCertificate(ctx);
  await ctx.deps.catalog.deleteCertificate(cert.hostname, cert.app); // checked again on the catalog itself, not this copy
  ctx.log.info({ app: cert.app, hostname: cert.hostname }, 'certificate removed');
  sendJson(ctx.res, 200, { ok: true });
}

/** Mounted with the Machines API routes. */
export const certificateRoutes: Route[] = [
  { method: 'POST', path: '/v1/apps/:app/certificates/custom', handler: addCustom },
  { method: 'POST', path: '/v1/apps/:app/certificates/acme', handler: requestAcme },
  { method: 'GET', path: '/v1/apps/:app/certificates', handler: list },
  { method: 'GET', path: '/v1/apps/:app/certificates/:hostname', handler: show },
  { method: 'DELETE', path: '/v1/apps/:app/certificates/:hostname', handler: remove },
];
