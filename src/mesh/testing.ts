// A lab for mesh tests and benchmarks: host network namespaces on a veth underlay, machine namespaces behind them
// (wired as the orchestrator wires machines, with its firewall), and the mesh of each host following one catalog.
import { execFile } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { machineAddress, openSqliteCatalog, type Catalog, type Host } from '../catalog/index.ts';
import { firewallRuleset, nftApply, FIREWALL_TABLE, NETWORKS_SET } from '../orchestrator/network.ts';
import { silentLogger } from '../shared/log.ts';
import { meshIdentity, removeMesh, startMesh, MIN_MESH_HOST_NUMBER, type MeshIdentity, type RunningMesh } from './index.ts';

const run = promisify(execFile);
const ip = (...args: string[]) => run('ip', args);

export interface LabHost {
  name: string;
  id: string;
  ns: string;
  /** Command prefix that runs a program in the host's namespace. */
  wrap: string[];
  underlay: string;
  number: number;
  dataDir: string;
  identity: MeshIdentity;
  /** The catalog row (with its mesh identity). */
  row: Host;
  mesh?: RunningMesh;
}

export interface LabMachine {
  ns: string;
  address: string;
}

export interface MeshLab {
  catalog: Catalog;
  hosts: LabHost[];
  /** Machines by `<host name><network>`, e.g. `a1`, and `a1x` for a second one when asked for. */
  machines: Record<string, LabMachine>;
  /** Starts the mesh of `host` (its row must be in the catalog for the others to peer with it). */
  startMesh(host: LabHost): Promise<RunningMesh>;
  close(): Promise<void>;
}

/**
 * Two hosts `a` and `b` (namespaces joined by one veth pair) with one machine (two with `twins`) per host and network
 * in `networks`, the organizations put in a fresh SQLite catalog. Nothing is started: call `startMesh` per host.
 */
export async function createMeshLab(opts: { networks: number[]; twins?: boolean }): Promise<MeshLab> {
  const tag = randomBytes(2).toString('hex');
  const steps: Array<() => Promise<unknown>> = [];
  const close = async () => {
    for (const s of steps.reverse()) await s().catch(() => undefined);
  };
  try {
    const dir = await mkdtemp(join(tmpdir(), 'tarmac-mesh-lab-'));
    steps.push(() => rm(dir, { recursive: true, force: true }));
    const catalog = openSqliteCatalog(join(dir, 'catalog.sqlite'));
    steps.push(() => catalog.close());
    const now = new Date().toISOString();
    for (const n of opts.networks) await catalog.putOrg({ slug: `org${n}`, name: `Org ${n}`, network_id: n, created_at: now });
    const subnet = `10.248.${randomInt(1, 250)}`;
    const hosts: LabHost[] = [];
    for (const [i, name] of ['a', 'b'].entries()) {
      const ns = `tml${tag}${name}`;
      await ip('netns', 'add', ns);
      steps.push(() => ip('netns', 'del', ns));
      await ip('-n', ns, 'link', 'set', 'lo', 'up');
      const number = MIN_MESH_HOST_NUMBER + randomInt(1, 0x7fff_ffff);
      const id = `lab-${tag}-${name}`;
      const underlay = `${subnet}.${i + 1}`;
      const dataDir = join(dir, name);
      const wrap = ['nsenter', `--net=/var/run/netns/${ns}`];
      const identity = await meshIdentity({ dataDir, hostNumber: number, endpoint: `${underlay}:51820` });
      steps.push(() => removeMesh({ hostId: id, dataDir, wrap }));
      const row: Host = { id, region: 'local', roles: ['worker'], host_number: number, cpus: 1, memory_mb: 512, address: underlay, mesh: identity.row, updated_at: now };
      hosts.push({ name, id, ns, wrap, underlay, number, dataDir, identity, row });
    }
    const [a, b] = hosts as [LabHost, LabHost];
    await ip('-n', a.ns, 'link', 'add', 'eth0', 'type', 'veth', 'peer', 'name', 'eth0', 'netns', b.ns);
    for (const h of hosts) {
      await ip('-n', h.ns, 'addr', 'add', `${h.underlay}/24`, 'dev', 'eth0');
      await ip('-n', h.ns, 'link', 'set', 'eth0', 'up');
      await nftApply(firewallRuleset(), { netns: `/var/run/netns/${h.ns}` });
    }
    const machines: Record<string, LabMachine> = {};
    for (const h of hosts) {
      for (const [n, twin] of opts.networks.flatMap((n): Array<[number, boolean]> => (opts.twins ? [[n, false], [n, true]] : [[n, false]]))) {
        const name = `${h.name}${n}${twin ? 'x' : ''}`;
        const ns = `tml${tag}m${name}`;
        const address = machineAddress(n, h.number, twin ? n + 100 : n);
        const hostIf = `tmv${tag}${name}`;
        await ip('netns', 'add', ns);
        steps.push(() => ip('netns', 'del', ns));
        await ip('-n', h.ns, 'link', 'add', hostIf, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns);
        for (const l of [`link set ${hostIf} up`, `addr add fe80::1/64 dev ${hostIf} nodad`, `route replace ${address}/128 dev ${hostIf}`]) await ip('-n', h.ns, ...l.split(' '));
        for (const l of ['link set lo up', 'link set eth0 up', `addr add ${address}/128 dev eth0 nodad`, 'route add default via fe80::1 dev eth0']) await ip('-n', ns, ...l.split(' '));
        machines[name] = { ns, address };
      }
    }
    return {
      catalog, hosts, machines, close,
      async startMesh(h) {
        const mesh = await startMesh({
          catalog, hostId: h.id, hostNumber: h.number, identity: h.identity, dataDir: h.dataDir, listenPort: 51820,
          firewall: { table: FIREWALL_TABLE, set: NETWORKS_SET }, log: silentLogger(), wrap: h.wrap,
        });
        steps.push(() => mesh.close());
        h.mesh = mesh;
        return mesh;
      },
    };
  } catch (e) {
    await close();
    throw e;
  }
}
