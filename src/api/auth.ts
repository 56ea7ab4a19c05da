// Bearer-token authentication: the admin token sees every org; catalog tokens with role 'org' see only their org.
import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { App, CatalogReader } from '../catalog/index.ts';
import { TarmacError } from '../shared/errors.ts';
import { hashToken } from '../shared/ids.ts';

export type Principal = { kind: 'admin'; name: string } | { kind: 'org'; org: string; name: string };

function sha256(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}

export function makeAuthenticator(catalog: CatalogReader, adminToken: string): (req: IncomingMessage) => Principal {
  const adminDigest = sha256(adminToken);
  return (req) => {
    const header = req.headers.authorization;
    if (!header) throw new TarmacError('unauthorized', 'missing Authorization header; send "Authorization: Bearer <token>"');
    const m = /^Bearer\s+(\S+)\s*$/i.exec(header);
    if (!m) throw new TarmacError('unauthorized', 'Authorization header must be "Bearer <token>"');
    const token = m[1]!;
    if (adminToken !== '' && timingSafeEqual(sha256(token), adminDigest)) return { kind: 'admin', name: 'admin' };
    const found = catalog.findToken(hashToken(token));
    if (!found) throw new TarmacError('unauthorized', 'invalid API token');
    if (found.role === 'admin') return { kind: 'admin', name: found.name };
    return { kind: 'org', org: found.org_slug, name: found.name };
  };
}

export function canSeeOrg(p: Principal, org: string): boolean {
  return p.kind === 'admin' || p.org === org;
}

/** The app, if it exists and the principal may see it; 404 otherwise (no hint that another org's app exists). */
export function visibleApp(catalog: CatalogReader, p: Principal, name: string): App {
  const app = catalog.getApp(name);
  if (!app || !canSeeOrg(p, app.org_slug)) throw new TarmacError('app_not_found', `app "${name}" not found`);
  return app;
}
