// Catalog rows shown in Fly's JSON shapes: apps, machines, events, leases.
import type { App, Lease, Machine, MachineEvent, MachineState, Org } from '../catalog/index.ts';
import type { AppResponse, ImageRefResponse, LeaseResponse, MachineEventResponse, MachineResponse } from '../client/index.ts';

/** Events included in a machine's JSON (Fly shows the latest few). */
export const machineEventsShown = 5;

/**
 * An app as Fly shows it. `created_at` is Unix milliseconds, as in Fly's create-app response; `id` is the
 * app's name (Fly's is an opaque id; names are unique here, so the name serves).
 */
export function presentApp(app: App, org: Org | undefined, machineCount: number): AppResponse {
  return {
    id: app.name,
    name: app.name,
    organization: { name: org?.name ?? app.org_slug, slug: app.org_slug },
    status: machineCount > 0 ? 'deployed' : 'pending',
    network: app.network,
    machine_count: machineCount,
    created_at: Date.parse(app.created_at),
  };
}

/** What a machine is, as Fly reports it: the worker's observed state, `created` until the worker has written one. */
export function machineState(m: Machine): MachineState {
  if (m.status) return m.status.state;
  return m.spec.desired === 'destroyed' ? 'destroyed' : 'created';
}

/**
 * A machine in Fly's shape. `config` is returned as the client gave it (Tarmac applies guest defaults at
 * placement and does not write them into the config, deliberately: a config read back equals the one sent).
 * `version` is the current version's instance_id, a string as in Fly (fly-go decodes it as a string).
 * `nonce` is shown while the machine is leased, as Fly documents (the same nonce GET /lease answers).
 */
export function presentMachine(m: Machine, events: MachineEvent[], lease?: Lease): MachineResponse {
  const { spec, status } = m;
  const out: MachineResponse = {
    id: spec.id,
    name: spec.name,
    state: machineState(m),
    region: spec.region,
    instance_id: spec.instance_id,
    private_ip: spec.private_ip,
    config: spec.config,
    image_ref: status?.image_ref ? { ...status.image_ref } : imageRefOf(spec.config.image),
    events: events.map(presentEvent),
    created_at: spec.created_at,
    updated_at: status && status.updated_at > spec.updated_at ? status.updated_at : spec.updated_at,
    host_status: 'ok',
    version: spec.instance_id,
    cordoned: spec.cordoned,
    desired_state: spec.desired,
  };
  if (lease && lease.expires_at > Date.now() / 1000) out.nonce = lease.nonce;
  // Check results belong to the instance the worker runs: shown while it is the current one.
  if (status?.checks && status.instance_id === spec.instance_id) out.checks = status.checks.map((c) => ({ ...c }));
  return out;
}

export function presentEvent(e: MachineEvent): MachineEventResponse {
  const out: MachineEventResponse = { id: e.id, type: e.type, status: e.status, source: e.source, timestamp: e.timestamp };
  if (e.request) out.request = e.request;
  return out;
}

export function presentLease(l: Lease): LeaseResponse {
  return {
    status: 'success',
    data: { nonce: l.nonce, expires_at: l.expires_at, owner: l.owner, description: l.description, version: l.version },
  };
}

/** The image reference split like Fly's `image_ref`, before the worker has resolved a digest. */
export function imageRefOf(image: string): ImageRefResponse {
  let rest = image;
  let digest = '';
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
  }
  let tag = '';
  const colon = rest.lastIndexOf(':');
  if (colon > rest.lastIndexOf('/')) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
  }
  let registry = 'docker.io';
  let repository = rest;
  const slash = rest.indexOf('/');
  if (slash >= 0) {
    const first = rest.slice(0, slash);
    if (first.includes('.') || first.includes(':') || first === 'localhost' || first.startsWith('[')) {
      registry = first;
      repository = rest.slice(slash + 1);
    }
  }
  if (registry === 'docker.io' && !repository.includes('/')) repository = `library/${repository}`;
  if (!tag && !digest) tag = 'latest';
  return { registry, repository, tag, digest, labels: {} };
}
