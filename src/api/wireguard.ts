// WireGuard peers API (`tarmac wireguard create`): an operator's device joins an org's private network through a
// gateway host. The caller makes the key pair and sends only the public key; the peer is kept on the org's row.
import { z } from 'zod';
import { machineAddress, networkPrefix, privateDnsAddress, type Catalog, type Host, type Org, type OrgWireguardPeer } from '../catalog/index.ts';
import type { WireguardPeerResponse } from '../client/index.ts';
import { TarmacError } from '../shared/errors.ts';
import { parseInput } from '../shared/validation.ts';
import { isWireguardKey } from '../shared/wireguard-keys.ts';
import { canSeeOrg } from './auth.ts';
import { readJsonBody, sendJson } from './http.ts';
import type { Ctx, Route } from './routes.ts';

const createSchema = z.strictObject({
  name: z.string().regex(/^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/, 'must be 1-63 lowercase letters, digits and dashes'),
  public_key: z.string().refine(isWireguardKey, 'must be a base64 WireGuard public key (44 characters, as `wg pubkey` prints)'),
  gateway: z.string().min(1).optional(),
});

/** The org, if the principal may see it; 404 otherwise. */
function visibleOrg(ctx: Ctx): Org {
  const slug = ctx.params['org'] ?? '';
  const org = ctx.deps.catalog.getOrg(slug);
  if (!org || !canSeeOrg(ctx.principal, slug)) throw new TarmacError('not_found', `organization "${slug}" not found`);
  return org;
}

/** A gateway: a worker (it serves fdaa::3) in the mesh; the named one, or the first by id. */
function gatewayHost(catalog: Catalog, id: string | undefined): Host {
  const gateways = catalog.listHosts().filter((h) => h.mesh && h.roles.includes('worker')).sort((a, b) => (a.id < b.id ? -1 : 1));
  const host = id === undefined ? gateways[0] : gateways.find((h) => h.id === id);
  if (host) return host;
  if (id !== undefined) throw new TarmacError('invalid_argument', `gateway: "${id}" is not a worker host in the mesh (hosts in the mesh: ${gateways.map((h) => h.id).join(', ') || 'none'})`);
  throw new TarmacError('failed_precondition', 'no worker host runs the mesh: enable [mesh] on the workers first');
}

function present(catalog: Catalog, org: Org, peer: OrgWireguardPeer): WireguardPeerResponse {
  const gw = catalog.getHost(peer.gateway);
  return {
    name: peer.name, org_slug: org.slug, address: peer.address, public_key: peer.public_key, dns: privateDnsAddress,
    allowed_ips: [`${networkPrefix(org.network_id)}::/48`, `${privateDnsAddress}/128`],
    gateway: { id: peer.gateway, public_key: gw?.mesh?.public_key ?? '', endpoint: gw?.mesh?.endpoint ?? '' },
    created_at: peer.created_at,
  };
}

async function create(ctx: Ctx): Promise<void> {
  const { catalog } = ctx.deps;
  const org = visibleOrg(ctx);
  const body = parseInput(createSchema, await readJsonBody(ctx.req) ?? {});
  if (org.wireguard_peers?.some((p) => p.name === body.name)) throw new TarmacError('name_taken', `name: organization "${org.slug}" already has a WireGuard peer "${body.name}"`);
  const gw = gatewayHost(catalog, body.gateway);
  const address = machineAddress(org.network_id, gw.host_number, await catalog.allocateMachineNumber(gw.id));
  const peer: OrgWireguardPeer = { name: body.name, public_key: body.public_key, address, gateway: gw.id, created_at: new Date().toISOString() };
  // Read-modify-write of the org row from this host's copy: two peers created at the same instant may race.
  const current = catalog.getOrg(org.slug) ?? org;
  await catalog.putOrg({ ...current, wireguard_peers: [...(current.wireguard_peers ?? []), peer] });
  ctx.log.info({ org: org.slug, peer: peer.name, gateway: gw.id, address }, 'wireguard peer created');
  sendJson(ctx.res, 201, present(catalog, org, peer));
}

async function list(ctx: Ctx): Promise<void> {
  const org = visibleOrg(ctx);
  sendJson(ctx.res, 200, { peers: (org.wireguard_peers ?? []).map((p) => present(ctx.deps.catalog, org, p)) });
}

async function remove(ctx: Ctx): Promise<void> {
  const org = visibleOrg(ctx);
  const name = ctx.params['name'] ?? '';
  if (!org.wireguard_peers?.some((p) => p.name === name)) throw new TarmacError('not_found', `organization "${org.slug}" has no WireGuard peer "${name}"`);
  await ctx.deps.catalog.putOrg({ ...org, wireguard_peers: org.wireguard_peers.filter((p) => p.name !== name) });
  sendJson(ctx.res, 200, { ok: true });
}

/** Mounted with the Machines API routes. */
export const wireguardRoutes: Route[] = [
  { method: 'POST', path: '/v1/orgs/:org/wireguard_peers', handler: create },
  { method: 'GET', path: '/v1/orgs/:org/wireguard_peers', handler: list },
  { method: 'DELETE', path: '/v1/orgs/:org/wireguard_peers/:name', handler: remove },
];
