// The WireGuard mesh across real hosts: four `tarmac host` processes in network namespaces on a private LAN (an edge
// with the API, workers in two regions, a fourth host started later), etcd on the LAN, machines of two organizations.
// Machines reach their own organization's machines on another host by `.internal` name; another organization, host
// ports and the underlay stay out of reach; a late host joins without restarts; a killed host leaves every peer list.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'undici';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { openEtcdCatalog } from '../src/catalog/index.ts';
import { hostMeshAddress, hostWirePrefix, meshInterfaceName, removeMesh } from '../src/mesh/index.ts';
import type { TarmacClient } from '../src/client/index.ts';
import { silentLogger } from '../src/shared/log.ts';
import { startEtcdCluster } from './helpers/etcd.ts';
import { startRegistry } from './helpers/registry.ts';
import { buildAndPushImage, httpImage } from './helpers/images.ts';
import { machineDebris, removeDebris, startHostProcess, type HostProcess } from './helpers/host-process.ts';
import { createLan, type LanHost } from './helpers/netns.ts';
import { missingPrerequisites } from './helpers/rootfs.ts';
import { waitFor } from './helpers/wait.ts';

const run = promisify(execFile);
const ttlSeconds = 3;

const whyNot = () => missingPrerequisites('namespaces, nftables, WireGuard', ['runc', 'conmon', 'nft', 'nsenter', 'umoci', 'skopeo', 'wg', 'wireguard-go', 'etcd']);

/**
 * The prober's command: resolve $SAME (an `.internal` name) with the machine's own resolver (busybox nslookup reads
 * /etc/resolv.conf: fdaa::3), GET / from that address on :8080 until it answers and log `same-org ADDRESS BODY`; then
 * try every `name=address,port` in $PROBES with the same HTTP request (busybox nc) and log `probe NAME REACHED|BLOCKED`;
 * then `probes done`. (busybox wget is not used: the static busybox's getaddrinfo crashed on IPv6 here.)
 */
const proberScript = [
  'get() { printf \'GET / HTTP/1.0\\r\\n\\r\\n\' | nc -w 2 "$1" "$2" 2>/dev/null; }',
  'i=0; body=""',
  'while [ $i -lt 40 ] && [ -z "$body" ]; do',
  '  addr=$(nslookup -type=aaaa "$SAME" 2>/dev/null | sed -n "s/^Address: *\\(fdaa:[0-9a-f:]*\\).*/\\1/p" | tail -n 1)',
  '  [ -n "$addr" ] && body=$(get "$addr" 8080 | tail -n 1)',
  '  i=$((i+1)); [ -z "$body" ] && sleep 0.2',
  'done',
  'echo "same-org $addr $body"',
  'probe() { i=0; while [ $i -lt 3 ]; do if [ -n "$(get "$2" "$3")" ]; then echo "probe $1 REACHED"; return; fi; i=$((i+1)); sleep 0.2; done; echo "probe $1 BLOCKED"; }',
  'for p in $PROBES; do n=${p%%=*}; r=${p#*=}; probe "$n" "${r%,*}" "${r##*,}" & done',
  'wait',
  'echo "probes done"',
  'exec sleep 600',
].join('\n');

/** GET `url` from inside namespace `at` (a node process entered there); rejects when it does not answer 200. */
async function fetchFrom(at: LanHost, url: string): Promise<string> {
  const code = `fetch(${JSON.stringify(url)}, { signal: AbortSignal.timeout(2000) }).then(async (r) => { if (!r.ok) process.exit(1); process.stdout.write(await r.text()); })`;
  return (await run(at.wrap[0]!, [...at.wrap.slice(1), process.execPath, '-e', code])).stdout;
}

async function logLines(client: TarmacClient, app: string, id: string): Promise<string[]> {
  const out: string[] = [];
  for await (const l of client.logs(app, { machine_id: id })) out.push(l.message);
  return out;
}

/** Stops a host with Ctrl-C, or kills it when it has not exited after a while. */
async function stopHost(h: HostProcess): Promise<void> {
  const timer = setTimeout(() => void h.kill(), 20_000);
  await h.stop().finally(() => clearTimeout(timer));
}

test('the mesh: an organization across hosts by .internal name, closed to others; hosts join and leave', { skip: whyNot(), timeout: 420_000 }, async (t) => {
  const cleanup: Array<() => Promise<unknown>> = [];
  t.after(async () => {
    for (const step of cleanup.reverse()) await step().catch((e: unknown) => t.diagnostic(`cleanup: ${String(e)}`));
  });
  const tag = randomBytes(2).toString('hex');
  const lan = await createLan(4);
  cleanup.push(() => lan.close());
  const [edgeNs, w1Ns, w2Ns, w3Ns] = lan.hosts as [LanHost, LanHost, LanHost, LanHost];
  const root = await mkdtemp(join(tmpdir(), 'tarmac-mesh-'));
  cleanup.push(() => rm(root, { recursive: true, force: true }));
  const etcd = await startEtcdCluster(3, { addresses: lan.hosts.slice(0, 3).map((h) => h.address), wrap: (i) => lan.hosts[i]!.wrap });
  cleanup.push(() => etcd.stop());
  const registry = await startRegistry({ address: lan.testAddress });
  cleanup.push(() => registry.stop());
  const web = await httpImage(registry.host);
  const prober = await buildAndPushImage(registry.host, 'prober', { cmd: ['sleep', '600'] });

  const catalogUrl = `etcd://${etcd.endpoints.join(',')}`;
  const dataDir = (name: string) => join(root, name);
  const ids = { edge: `edge-${tag}`, w1: `w1-${tag}`, w2: `w2-${tag}`, w3: `w3-${tag}` };
  const hosts = new Map<string, HostProcess>();
  const startHost = async (name: keyof typeof ids, at: LanHost, roles: string[], region: string): Promise<HostProcess> => {
    const config = join(root, `${name}.toml`);
    await writeFile(config, [
      `host_id = "${ids[name]}"`, `region = "${region}"`, `roles = [${roles.map((r) => `"${r}"`).join(', ')}]`, `catalog = "${catalogUrl}"`,
      `host_ttl_seconds = ${ttlSeconds}`, `insecure_registries = ["${registry.host}"]`,
      `[api]\nhost = "${at.address}"\nport = 4280`,
      // Metrics on every address, the host's mesh address included: machines must still not reach it.
      '[metrics]\nhost = "::"\nport = 9480',
      // No backhaul address: with the mesh, workers take backhaul at their mesh address.
      `[proxy]\nhttp = { host = "${at.address}", port = 8080 }`,
      `[mesh]\nenabled = true\nendpoint = "${at.address}:51820"`,
      '',
    ].join('\n'));
    cleanup.push(() => removeMesh({ hostId: ids[name], dataDir: dataDir(name), wrap: at.wrap }));
    const h = await startHostProcess(dataDir(name), { args: ['--config', config], wrap: at.wrap, timeoutMs: 90_000 });
    hosts.set(name, h);
    return h;
  };
  cleanup.push(async () => {
    for (const h of hosts.values()) await stopHost(h);
  });
  const edge = await startHost('edge', edgeNs, ['edge', 'api'], 'ams');
  const w1 = await startHost('w1', w1Ns, ['worker', 'api'], 'ams'); // its API serves the logs of its machines
  await startHost('w2', w2Ns, ['worker'], 'fra');
  const api = edge.client;
  await waitFor('three hosts registered', async () => (await api.listHosts()).total_hosts === 3);

  /** The peers' AllowedIPs of host `name`'s WireGuard interface. */
  const allowedIps = async (name: keyof typeof ids) => (await run('wg', ['show', meshInterfaceName(ids[name]), 'allowed-ips'])).stdout;
  const numbers = Object.fromEntries((await api.listHosts()).hosts.map((h) => [h.id, h.host_number]));
  const prefixOf = (name: keyof typeof ids) => hostWirePrefix(numbers[ids[name]]!);
  for (const name of ['edge', 'w1', 'w2'] as const) {
    await waitFor(`${name} to have the two others as peers`, async () => {
      const peers = await allowedIps(name);
      return (['edge', 'w1', 'w2'] as const).filter((o) => o !== name).every((o) => peers.includes(prefixOf(o)));
    }, 10_000);
  }

  // A second organization, written straight into the catalog (the API has no org endpoint yet).
  const catalog = await openEtcdCatalog({ endpoints: etcd.endpoints, mirrorPath: join(root, 'test-mirror.sqlite'), log: silentLogger() });
  cleanup.push(() => catalog.close());
  await catalog.putOrg({ slug: 'other', name: 'Other', network_id: await catalog.allocateNetworkNumber(), created_at: new Date().toISOString() });

  // Web servers of both organizations on w2 (fra); probers of both on w1 (ams).
  const webConfig = { image: web, services: [{ protocol: 'tcp' as const, internal_port: 8080, ports: [{ port: 80, handlers: ['http' as const] }] }] };
  await api.createApp({ app_name: `one-web-${tag}`, org_slug: 'personal' });
  await api.createApp({ app_name: `two-web-${tag}`, org_slug: 'other' });
  await api.createApp({ app_name: `one-probe-${tag}`, org_slug: 'personal' });
  await api.createApp({ app_name: `two-probe-${tag}`, org_slug: 'other' });
  const apps = [`one-web-${tag}`, `two-web-${tag}`, `one-probe-${tag}`, `two-probe-${tag}`];
  const machineIds: string[] = [];
  cleanup.push(async () => {
    for (const app of apps) await api.deleteApp(app).catch(() => undefined);
    for (const w of ['w1', 'w2']) {
      const cleaned = hosts.has(w) && await waitFor(`${w} to remove its machines`, async () => (await machineDebris(dataDir(w), machineIds)).length === 0, 60_000)
        .then(() => true, () => false);
      if (!cleaned) await removeDebris(dataDir(w), machineIds);
    }
  });
  const oneWeb = await api.createMachine(`one-web-${tag}`, { config: webConfig, region: 'fra' });
  const twoWeb = await api.createMachine(`two-web-${tag}`, { config: webConfig, region: 'fra' });
  machineIds.push(oneWeb.id, twoWeb.id);
  for (const [app, m] of [[`one-web-${tag}`, oneWeb], [`two-web-${tag}`, twoWeb]] as const) await api.waitMachine(app, m.id, { state: 'started', timeout: 90 });

  const w1Mesh = hostMeshAddress(numbers[ids.w1]!);
  const w2Mesh = hostMeshAddress(numbers[ids.w2]!);
  // Control: the hosts' metrics answer over the mesh between hosts, so a BLOCKED from a machine is the firewall's doing.
  const fromEdge = await waitFor('the edge to reach w2\'s metrics over the mesh', async () => {
    return fetchFrom(edgeNs, `http://[${w2Mesh}]:9480/metrics`);
  }, 10_000);
  assert.match(fromEdge, /^# (HELP|TYPE)/m);
  // App traffic enters at the edge and crosses the backhaul over the mesh to w2's proxy (at w2's mesh address: no
  // other way from the edge to w2's machines exists, as the edge is no machine of their organization).
  const viaEdge = await waitFor('the edge to serve one-web from w2 over the mesh backhaul', async () => {
    const res = await request(`http://${edgeNs.address}:8080/`, { headers: { host: `one-web-${tag}.localhost` } });
    const body = await res.body.text();
    return res.statusCode === 200 ? body : undefined;
  }, 30_000);
  assert.match(viaEdge, new RegExp(oneWeb.id));

  const probes = (otherWeb: string) => [
    `other-org=${otherWeb},8080`, // another organization's machine on another host, by address
    `own-host=${hostMeshAddress(numbers[ids.w1]!)},9480`, // its own host's metrics, at the host's mesh address
    `other-host=${w2Mesh},9480`, // the other worker's metrics over the mesh
    `other-host-api=${w2Mesh},4280`,
    `other-host-backhaul=${w2Mesh},4281`, // the other worker's backhaul, which trusts forwarding headers
    `underlay=${w2Ns.address},9480`, // the underlay (IPv4)
    `edge-api=${edgeNs.address},4280`,
    `etcd=${edgeNs.address},2379`,
  ].join(' ');
  const oneProbe = await api.createMachine(`one-probe-${tag}`, {
    region: 'ams', config: { image: prober, env: { SAME: `one-web-${tag}.internal`, PROBES: probes(twoWeb.private_ip) }, init: { cmd: ['sh', '-c', proberScript] } },
  });
  const twoProbe = await api.createMachine(`two-probe-${tag}`, {
    region: 'ams', config: { image: prober, env: { SAME: `two-web-${tag}.internal`, PROBES: probes(oneWeb.private_ip) }, init: { cmd: ['sh', '-c', proberScript] } },
  });
  machineIds.push(oneProbe.id, twoProbe.id);
  assert.notEqual(w1Mesh, w2Mesh);

  const placed = Object.fromEntries((await api.listHosts()).hosts.map((h) => [h.id, h.machines]));
  assert.equal(placed[ids.w1], 2, 'the probers run on w1');
  assert.equal(placed[ids.w2], 2, 'the web servers run on w2');

  for (const [app, m, target] of [[`one-probe-${tag}`, oneProbe, oneWeb], [`two-probe-${tag}`, twoProbe, twoWeb]] as const) {
    const lines = await waitFor(`${app} to finish its probes`, async () => {
      const l = await logLines(w1.client, app, m.id);
      return l.includes('probes done') ? l : undefined;
    }, 120_000).catch(async (e: unknown) => {
      t.diagnostic(`${app} logged: ${(await logLines(w1.client, app, m.id)).join(' | ')}`);
      throw e;
    });
    const same = lines.find((l) => l.startsWith('same-org '));
    assert.equal(same, `same-org ${target.private_ip} ${target.id}`, `${app} fetched its organization's web server on the other host by name: ${lines.join(' | ')}`);
    const results = Object.fromEntries(lines.flatMap((l) => {
      const r = /^probe (\S+) (REACHED|BLOCKED)$/.exec(l);
      return r ? [[r[1]!, r[2]!]] : [];
    }));
    assert.deepEqual(results, {
      'other-org': 'BLOCKED', 'own-host': 'BLOCKED', 'other-host': 'BLOCKED', 'other-host-api': 'BLOCKED', 'other-host-backhaul': 'BLOCKED',
      underlay: 'BLOCKED', 'edge-api': 'BLOCKED', etcd: 'BLOCKED',
    }, `${app}: ${lines.join(' | ')}`);
  }

  // A host started later joins without restarting the others, and traffic reaches it over the mesh.
  const joinStart = Date.now();
  await startHost('w3', w3Ns, ['worker'], 'sin');
  const w3Numbers = Object.fromEntries((await api.listHosts()).hosts.map((h) => [h.id, h.host_number]));
  numbers[ids.w3] = w3Numbers[ids.w3]!;
  for (const name of ['edge', 'w1', 'w2'] as const) {
    await waitFor(`${name} to add w3 as a peer`, async () => (await allowedIps(name)).includes(prefixOf('w3')), 10_000);
  }
  const w3Metrics = await waitFor('w1 to reach w3 over the mesh', async () => {
    return fetchFrom(w1Ns, `http://[${hostMeshAddress(numbers[ids.w3]!)}]:9480/metrics`);
  }, 15_000);
  assert.match(w3Metrics, /^# (HELP|TYPE)/m);
  t.diagnostic(`w3: process start to traffic from w1 over the mesh in ${Date.now() - joinStart} ms`);

  // A host that dies leaves every peer list once its registration lapses.
  await hosts.get('w3')!.kill();
  hosts.delete('w3');
  for (const name of ['edge', 'w1', 'w2'] as const) {
    await waitFor(`${name} to drop w3`, async () => !(await allowedIps(name)).includes(prefixOf('w3')), (ttlSeconds + 15) * 1000);
  }
  assert.ok((await allowedIps('w1')).includes(prefixOf('w2')), 'the others stay');
});
