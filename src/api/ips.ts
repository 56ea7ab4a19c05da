// IPs API (Fly's ip_assignments): addresses of an app's own from the configured pool, allocated by compare-and-swap; list and release.
import { z } from 'zod';
import type { IpAssignment } from '../catalog/index.ts';
import type { IpAssignmentResponse } from '../client/index.ts';
import { TarmacError } from '../shared/errors.ts';
import { canonicalIp, firstFreeIp } from '../shared/ip-pool.ts';
import { parseInput } from '../shared/validation.ts';
import { visibleApp } from './auth.ts';
import { readJsonBody, sendJson } from './http.ts';
import type { Ctx, Route } from './routes.ts';

const allocateSchema = z.strictObject({
  type: z.enum(['v4', 'v6']),
  region: z.string().regex(/^[a-z0-9-]{2,32}$/, 'must be a region code like "ord" or "global"').optional(),
  org_slug: z.string().min(1).optional(),
});

/** Addresses tried before giving up when other APIs keep taking the one picked (each failure moves to the next). */
const allocateAttempts = 32;

/** Fly's IPAssignment shape, with the address family. */
function presentIp(ip: IpAssignment): IpAssignmentResponse {
  return { ip: ip.ip, type: ip.type, region: ip.region, shared: false, service_name: '', created_at: ip.created_at };
}

async function allocate(ctx: Ctx): Promise<void> {
  const { catalog, ipPool } = ctx.deps;
  const app = visibleApp(catalog, ctx.principal, ctx.params['app'] ?? '');
  const body = parseInput(allocateSchema, await readJsonBody(ctx.req) ?? {});
  if (body.org_slug !== undefined && body.org_slug !== app.org_slug) {
    throw new TarmacError('invalid_argument', `org_slug: app "${app.name}" belongs to organization "${app.org_slug}", not "${body.org_slug}"`);
  }
  const ranges = ipPool[body.type];
  if (ranges.length === 0) {
    throw new TarmacError('failed_precondition', `type: this fleet has no ${body.type === 'v4' ? 'IPv4' : 'IPv6'} pool (proxy.ip_pool.${body.type} in the host config)`);
  }
  // Pick from this host's copy of the catalog; the catalog's compare-and-swap settles races between APIs.
  const tried = new Set<string>();
  for (let attempt = 0; attempt < allocateAttempts; attempt++) {
    const ip = firstFreeIp(ranges, (a) => tried.has(a) || catalog.getIpAssignment(a) !== undefined);
    if (ip === undefined) {
      throw new TarmacError('no_capacity', `every address of the ${body.type} pool (${ranges.map((r) => r.cidr).join(', ')}) is assigned; release one or widen proxy.ip_pool.${body.type}`);
    }
    const row: IpAssignment = { ip, app: app.name, type: body.type, region: body.region ?? 'global', created_at: new Date().toISOString() };
    try {
      await catalog.createIpAssignment(row);
    } catch (e) {
      if (e instanceof TarmacError && e.code === 'name_taken') {
        tried.add(ip);
        continue;
      }
      throw e;
    }
    ctx.log.info({ app: app.name, ip }, 'address allocated');
    sendJson(ctx.res, 200, presentIp(row));
    return;
  }
  throw new TarmacError('conflict', 'other allocations kept taking the free addresses; retry');
}

async function list(ctx: Ctx): Promise<void> {
  const app = visibleApp(ctx.deps.catalog, ctx.principal, ctx.params['app'] ?? '');
  sendJson(ctx.res, 200, { ips: ctx.deps.catalog.listIpAssignments(app.name).map(presentIp) });
}

async function release(ctx: Ctx): Promise<void> {
  const app = visibleApp(ctx.deps.catalog, ctx.principal, ctx.params['app'] ?? '');
  const given = ctx.params['ip'] ?? '';
  const ip = canonicalIp(given);
  if (ip === undefined) throw new TarmacError('invalid_argument', `ip: "${given}" is not an IPv4 or IPv6 address`);
  const held = ctx.deps.catalog.getIpAssignment(ip);
  if (!held || held.app !== app.name) throw new TarmacError('not_found', `app "${app.name}" has no address ${ip}`);
  await ctx.deps.catalog.deleteIpAssignment(ip, app.name); // checked again on the catalog itself, not this copy
  ctx.log.info({ app: app.name, ip }, 'address released');
  sendJson(ctx.res, 200, { ok: true });
}

/** Mounted with the Machines API routes. */
export const ipRoutes: Route[] = [
  { method: 'POST', path: '/v1/apps/:app/ip_assignments', handler: allocate },
  { method: 'GET', path: '/v1/apps/:app/ip_assignments', handler: list },
  { method: 'DELETE', path: '/v1/apps/:app/ip_assignments/:ip', handler: release },
];
