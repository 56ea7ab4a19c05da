// The mesh's public face: a host's WireGuard identity for its catalog row, and the agent that keeps the mesh current.
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import type { CatalogReader, HostMesh } from '../catalog/index.ts';
import { TarmacError } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';
import { hostMeshAddress, hostWirePrefix, isMeshHostNumber } from './addressing.ts';
import { MeshAgent } from './agent.ts';
import { hostKeyPair } from './keys.ts';
import { ensureInterface, removeInterface } from './wireguard.ts';

export { MIN_MESH_HOST_NUMBER, hostMeshAddress, hostWirePrefix } from './addressing.ts';
export { MESH_TABLE } from './firewall.ts';
export { startLocalNetworks, type RunningLocalNetworks } from './local.ts';

/** Name of a host's mesh interface: `tmw` + 10 hex of its id (distinct per host: wireguard-go's sockets are shared). */
export function meshInterfaceName(hostId: string): string {
  return 'tmw' + createHash('sha256').update(hostId).digest('hex').slice(0, 10);
}

export interface MeshIdentityOptions {
  /** The host's data dir; the key lives in `<dataDir>/mesh/private-key`. */
  dataDir: string;
  hostNumber: number;
  /** `ip:port` other hosts send WireGuard packets to. */
  endpoint: string;
}

/** A host's mesh identity: what goes into its catalog row, and the private key that never leaves the data dir. */
export interface MeshIdentity {
  row: HostMesh;
  privateKey: string;
}

/** Loads (or on first start makes) the host's key pair and describes the host for the catalog. */
export async function meshIdentity(o: MeshIdentityOptions): Promise<MeshIdentity> {
  if (!isMeshHostNumber(o.hostNumber)) {
    throw new TarmacError('failed_precondition', `host number ${o.hostNumber} predates the mesh (it needs the top bit set): remove host-number from the data dir of this host (its machines get new addresses)`);
  }
  const keys = await hostKeyPair(join(o.dataDir, 'mesh'));
  return { privateKey: keys.privateKey, row: { public_key: keys.publicKey, endpoint: o.endpoint, prefixes: [hostWirePrefix(o.hostNumber)] } };
}

export interface MeshOptions {
  catalog: CatalogReader;
  hostId: string;
  hostNumber: number;
  identity: MeshIdentity;
  dataDir: string;
  listenPort: number;
  /** The machines' firewall (nftables inet table and its set of allowed source/destination pairs), which the mesh fills. */
  firewall: { table: string; set: string };
  log: Logger;
  /** Command prefix for every tool the mesh runs (e.g. `nsenter --net=…` to work on another network namespace). */
  wrap?: readonly string[];
}

export interface RunningMesh {
  readonly ifname: string;
  readonly implementation: 'kernel' | 'wireguard-go';
  /** This host's own address in the mesh. */
  readonly address: string;
  /** Applies the catalog as it is now (changes apply by themselves; this is for callers that must know when). */
  sync(): Promise<void>;
  /** Stops following the catalog; the interface stays up for the machines (see `removeMesh`). */
  close(): Promise<void>;
}

/** Brings up the host's WireGuard interface and keeps its peers and firewall equal to the catalog. */
export async function startMesh(o: MeshOptions): Promise<RunningMesh> {
  const ifname = meshInterfaceName(o.hostId);
  const wrap = o.wrap ?? [];
  const stateDir = join(o.dataDir, 'mesh');
  const implementation = await ensureInterface({ ifname, hostNumber: o.hostNumber, stateDir, wrap, log: o.log });
  const agent = new MeshAgent({
    catalog: o.catalog, hostId: o.hostId, hostNumber: o.hostNumber, ifname, stateDir, privateKey: o.identity.privateKey,
    listenPort: o.listenPort, firewall: o.firewall, wrap, log: o.log,
  });
  await agent.start();
  return { ifname, implementation, address: hostMeshAddress(o.hostNumber), sync: () => agent.kick(), close: () => agent.close() };
}

/** Takes a host's mesh interface down for good (uninstall, tests): wireguard-go stopped or the kernel link deleted. */
export async function removeMesh(o: { hostId: string; dataDir: string; wrap?: readonly string[] }): Promise<void> {
  await removeInterface({ ifname: meshInterfaceName(o.hostId), stateDir: join(o.dataDir, 'mesh'), wrap: o.wrap ?? [] });
}
