// The mesh on its own: keys, rendered configs, and two hosts (network namespaces running wireguard-go) following one
// catalog, with machine namespaces behind them: traffic within an organization flows, everything else must fail.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { machineAddress } from '../catalog/index.ts';
import { newWireguardKeyPair } from '../shared/wireguard-keys.ts';
import { wireguardConfigFile } from '../cli/wireguard.ts';
import { waitFor } from '../../test/helpers/wait.ts';
import { renderWireguardConfig } from './config.ts';
import { meshRuleset } from './firewall.ts';
import { hostKeyPair } from './keys.ts';
import { hostMeshAddress, hostWirePrefix, meshIdentity, meshInterfaceName, MIN_MESH_HOST_NUMBER } from './index.ts';
import { createMeshLab, type LabHost } from './testing.ts';

const run = promisify(execFile);
const haveTools = async () => Promise.all(['wg', 'wireguard-go', 'nft', 'nsenter'].map((c) => run('sh', ['-c', `command -v ${c}`]))).then(() => true, () => false);
const skip = process.getuid?.() !== 0 ? 'needs root' : !(await haveTools()) ? 'needs wireguard-tools, wireguard-go, nftables' : false;

test('a host key is made once, kept 0600, and matches wg pubkey', { skip: skip && 'needs wg' }, async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-mesh-key-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const a = await hostKeyPair(dir);
  const b = await hostKeyPair(dir);
  assert.deepEqual(a, b);
  assert.equal((await stat(join(dir, 'private-key'))).mode & 0o777, 0o600);
  const { stdout } = await new Promise<{ stdout: string }>((resolve, reject) => {
    const c = execFile('wg', ['pubkey'], (e, out) => (e ? reject(e) : resolve({ stdout: out })));
    c.stdin!.end(a.privateKey + '\n');
  });
  assert.equal(stdout.trim(), a.publicKey);
});

test('a WireGuard config renders every peer, sorted, the same for the same input', () => {
  const peers = [
    { publicKey: 'b'.repeat(43) + '=', endpoint: '10.0.0.2:51820', allowedIps: ['fdaa:8000:2::/48'] },
    { publicKey: 'a'.repeat(43) + '=', allowedIps: ['fdaa:0:1:8000:1:0:5:2/128'], persistentKeepalive: 25 },
  ];
  const text = renderWireguardConfig({ privateKey: 'k'.repeat(43) + '=', listenPort: 51820, peers });
  assert.equal(text, renderWireguardConfig({ privateKey: 'k'.repeat(43) + '=', listenPort: 51820, peers: [...peers].reverse() }));
  assert.equal(text, [
    '[Interface]', `PrivateKey = ${'k'.repeat(43)}=`, 'ListenPort = 51820', '',
    '[Peer]', `PublicKey = ${'a'.repeat(43)}=`, 'AllowedIPs = fdaa:0:1:8000:1:0:5:2/128', 'PersistentKeepalive = 25', '',
    '[Peer]', `PublicKey = ${'b'.repeat(43)}=`, 'Endpoint = 10.0.0.2:51820', 'AllowedIPs = fdaa:8000:2::/48', '',
  ].join('\n'));
});

test('a host number without the top bit cannot join the mesh', async () => {
  await assert.rejects(meshIdentity({ dataDir: '/nonexistent', hostNumber: 5, endpoint: '10.0.0.1:51820' }), /predates the mesh/);
});

test('the mesh ruleset is one valid nft batch', { skip }, async () => {
  const script = meshRuleset({
    ifname: 'tmwtest', hostNumber: MIN_MESH_HOST_NUMBER + 5, firewall: { table: 'tarmac', set: 'networks' }, networks: [1, 2, 2],
    operators: [{ address: 'fdaa:0:1:8000:5:0:9:2', network: 1 }], dnsAddress: 'fdaa::3',
  });
  assert.match(script, /fdaa:0:1::\/48 \. fdaa:0:1::\/48, fdaa:0:2::\/48 \. fdaa:0:2::\/48 \}/);
  const child = spawn('nft', ['-c', '-f', '-'], { stdio: ['pipe', 'ignore', 'pipe'] });
  let err = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  child.stdin.end(script);
  const code = await new Promise((r) => child.on('close', r));
  assert.equal(code, 0, err);
});

// ---- two hosts in network namespaces ----

const ip = (...args: string[]) => run('ip', args);

/** A TCP server in namespace `ns` on [::]:port that answers `text` to every connection. */
function serve(ns: string, port: number, text: string): ChildProcess {
  const code = `require('node:net').createServer((s) => s.end(${JSON.stringify(text)})).listen(${port}, '::', () => console.log('up'))`;
  return spawn('nsenter', [`--net=/var/run/netns/${ns}`, process.execPath, '-e', code], { stdio: ['ignore', 'pipe', 'inherit'] });
}

/** What a TCP connection from namespace `ns` (from address `from`, when given) to [to]:port reads, or `fail: reason`. */
async function probe(ns: string, to: string, port: number, from?: string): Promise<string> {
  const code = `
    const s = require('node:net').connect({ host: ${JSON.stringify(to)}, port: ${port}${from ? `, localAddress: ${JSON.stringify(from)}` : ''} });
    let d = ''; s.setEncoding('utf8').on('data', (x) => (d += x));
    s.setTimeout(1500, () => { console.log('fail: timeout'); process.exit(0); });
    s.on('end', () => { console.log(d); process.exit(0); });
    s.on('error', (e) => { console.log('fail: ' + e.code); process.exit(0); });`;
  const { stdout } = await run('nsenter', [`--net=/var/run/netns/${ns}`, process.execPath, '-e', code]);
  return stdout.trim();
}

test('two hosts: peers follow the catalog; an organization reaches itself across hosts and nothing else', { skip, timeout: 120_000 }, async (t) => {
  const lab = await createMeshLab({ networks: [1, 2], twins: true });
  t.after(() => lab.close());
  const { catalog, machines } = lab;
  const [a, b] = lab.hosts as [LabHost, LabHost];
  const servers: ChildProcess[] = [];
  t.after(() => servers.forEach((s) => s.kill()));
  for (const [name, m] of Object.entries(machines)) {
    const s = serve(m.ns, 8080, `hello from ${name}`);
    servers.push(s);
    await new Promise((r) => s.stdout!.once('data', r));
  }

  // Both hosts in the catalog with their mesh identity, each running the mesh in its namespace.
  for (const h of lab.hosts) {
    await catalog.putHost(h.row);
    const mesh = await lab.startMesh(h);
    assert.equal(mesh.ifname, meshInterfaceName(h.id));
  }
  const peersOf = async (h: LabHost) => (await run('wg', ['show', meshInterfaceName(h.id), 'allowed-ips'])).stdout.trim();
  await waitFor('a to have b as its peer', async () => (await peersOf(a)).includes(hostWirePrefix(b.number)), 5_000);
  assert.ok((await peersOf(b)).includes(hostWirePrefix(a.number)));

  // Same organization across hosts: both directions.
  assert.equal(await waitFor('a1 to reach b1', async () => {
    const r = await probe(machines['a1']!.ns, machines['b1']!.address, 8080);
    return r.startsWith('fail') ? undefined : r;
  }, 10_000), 'hello from b1');
  assert.equal(await probe(machines['b2']!.ns, machines['a2']!.address, 8080), 'hello from a2');
  assert.equal(await probe(machines['a1']!.ns, machines['a1x']!.address, 8080), 'hello from a1x', 'same organization, same host');
  // Hosts reach each other's mesh address (host-to-host traffic).
  const hostListener = serve(b.ns, 7001, 'b host');
  servers.push(hostListener);
  await new Promise((r) => hostListener.stdout!.once('data', r));
  assert.equal(await probe(a.ns, hostMeshAddress(b.number), 7001), 'b host');

  // Everything else fails: another organization, the other host's own ports (mesh and underlay), this host's ports.
  assert.match(await probe(machines['a1']!.ns, machines['b2']!.address, 8080), /^fail/, 'another organization on the other host');
  assert.match(await probe(machines['a1']!.ns, machines['a2']!.address, 8080), /^fail/, 'another organization on the same host');
  assert.match(await probe(machines['a1']!.ns, hostMeshAddress(b.number), 7001), /^fail/, 'the other host over the mesh');
  assert.match(await probe(machines['a1']!.ns, hostMeshAddress(a.number), 7001), /^fail/, 'its own host over the mesh');
  assert.match(await probe(machines['a1']!.ns, `::ffff:${b.underlay}`, 7001), /^fail/, 'the underlay');

  // The receiving host checks on its own: host a sends (bypassing its machines' firewall) from addresses it may not use.
  const forged = {
    otherOrg: machineAddress(2, a.number, 99), // a's host bits, organization two → b1 (organization one)
    otherHost: machineAddress(1, b.number + 1, 99), // organization one, but host bits a does not own
    control: machineAddress(1, a.number, 99),
  };
  for (const f of Object.values(forged)) await ip('-n', a.ns, 'addr', 'add', `${f}/128`, 'dev', 'lo', 'nodad');
  assert.equal(await probe(a.ns, machines['b1']!.address, 8080, forged.control), 'hello from b1', 'control: a source of a and of organization one');
  assert.match(await probe(a.ns, machines['b1']!.address, 8080, forged.otherOrg), /^fail/, 'b refuses another organization\'s source');
  assert.match(await probe(a.ns, machines['b1']!.address, 8080, forged.otherHost), /^fail/, 'b refuses a source outside a\'s prefix');

  // A machine cannot spoof: a source address of another machine is dropped on its own host.
  await ip('-n', machines['a1']!.ns, 'addr', 'add', `${forged.control}/128`, 'dev', 'eth0', 'nodad');
  assert.match(await probe(machines['a1']!.ns, machines['b1']!.address, 8080, forged.control), /^fail/, 'spoofed source');

  // Host b leaves the mesh (its row without a mesh; test/mesh.test.ts lets a host's lease expire): it disappears as a
  // peer of a, and traffic stops.
  const removedAt = Date.now();
  const { mesh: _, ...withoutMesh } = catalog.getHost(b.id)!;
  await catalog.putHost(withoutMesh);
  await waitFor('b to disappear from a\'s peers', async () => !(await peersOf(a)).includes(hostWirePrefix(b.number)), 5_000);
  t.diagnostic(`peer removed ${Date.now() - removedAt} ms after the catalog change`);
  assert.match(await probe(machines['a1']!.ns, machines['b1']!.address, 8080), /^fail/);
});

test('an operator\'s device joins its organization through a gateway: its machines on every host and DNS, nothing else', { skip, timeout: 120_000 }, async (t) => {
  // Cleanup in reverse order of setup (the device's wireguard-go must stop before the namespaces go).
  const cleanup: Array<() => Promise<unknown>> = [];
  t.after(async () => {
    for (const c of cleanup.reverse()) await c().catch((e: unknown) => t.diagnostic(`cleanup: ${String(e)}`));
  });
  const lab = await createMeshLab({ networks: [1, 2] });
  cleanup.push(() => lab.close());
  const { catalog, machines } = lab;
  const [a] = lab.hosts as [LabHost, LabHost];
  const servers: ChildProcess[] = [];
  cleanup.push(async () => servers.forEach((s) => s.kill()));
  const listen = async (ns: string, port: number, text: string, host = '::') => {
    const code = `require('node:net').createServer((s) => s.end(${JSON.stringify(text)})).listen(${port}, ${JSON.stringify(host)}, () => console.log('up'))`;
    const s = spawn('nsenter', [`--net=/var/run/netns/${ns}`, process.execPath, '-e', code], { stdio: ['ignore', 'pipe', 'inherit'] });
    servers.push(s);
    await new Promise((r) => s.stdout!.once('data', r));
  };
  for (const [name, m] of Object.entries(machines)) await listen(m.ns, 8080, `hello from ${name}`);
  // The gateway's resolver address (a DNS stand-in on TCP 53) and a host port the device must not reach.
  await ip('-n', a.ns, 'addr', 'add', 'fdaa::3/128', 'dev', 'lo', 'nodad');
  await listen(a.ns, 53, 'dns', 'fdaa::3');
  await listen(a.ns, 7001, 'gateway host');
  for (const h of lab.hosts) {
    await catalog.putHost(h.row);
    await lab.startMesh(h);
  }

  // The device: its own namespace, linked to the gateway's underlay.
  const device = `${a.ns}op`;
  await ip('netns', 'add', device);
  cleanup.push(() => ip('netns', 'del', device));
  await ip('-n', a.ns, 'link', 'add', 'eth1', 'type', 'veth', 'peer', 'name', 'eth0', 'netns', device);
  await ip('-n', a.ns, 'addr', 'add', '10.246.0.1/24', 'dev', 'eth1');
  await ip('-n', a.ns, 'link', 'set', 'eth1', 'up');
  for (const l of ['link set lo up', 'addr add 10.246.0.2/24 dev eth0', 'link set eth0 up', `route add ${a.underlay}/32 via 10.246.0.1`]) await ip('-n', device, ...l.split(' '));

  // What `tarmac wireguard create` stores and prints (src/api/wireguard.ts, src/cli/wireguard.ts).
  const keys = newWireguardKeyPair();
  const address = machineAddress(1, a.number, 77);
  const org = catalog.getOrg('org1')!;
  await catalog.putOrg({ ...org, wireguard_peers: [{ name: 'laptop', public_key: keys.publicKey, address, gateway: a.id, created_at: new Date().toISOString() }] });
  const config = wireguardConfigFile({
    name: 'laptop', org_slug: 'org1', address, public_key: keys.publicKey, dns: 'fdaa::3', allowed_ips: ['fdaa:0:1::/48', 'fdaa::3/128'],
    gateway: { id: a.id, public_key: a.identity.row.public_key, endpoint: a.identity.row.endpoint }, created_at: '',
  }, keys.privateKey);
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-wg-op-'));
  cleanup.push(() => rm(dir, { recursive: true, force: true }));
  const ifname = `tmo${a.ns.slice(3, 7)}`;
  const file = join(dir, `${ifname}.conf`);
  // wg-quick as an operator runs it; DNS= is left out only because it would call resolvconf on this machine.
  await writeFile(file, config.split('\n').filter((l) => !l.startsWith('DNS =')).join('\n'), { mode: 0o600 });
  await run('nsenter', [`--net=/var/run/netns/${device}`, 'wg-quick', 'up', file]);
  cleanup.push(() => run('nsenter', [`--net=/var/run/netns/${device}`, 'wg-quick', 'down', file]));
  await waitFor('the gateway to add the device as a peer', async () => (await run('wg', ['show', meshInterfaceName(a.id), 'allowed-ips'])).stdout.includes(`${address}/128`), 5_000);

  assert.equal(await waitFor('the device to reach its org on the gateway', async () => {
    const r = await probe(device, machines['a1']!.address, 8080);
    return r.startsWith('fail') ? undefined : r;
  }, 10_000), 'hello from a1');
  assert.equal(await probe(device, machines['b1']!.address, 8080), 'hello from b1', 'its org on another host, through the gateway');
  assert.equal(await probe(device, 'fdaa::3', 53), 'dns', 'the gateway\'s DNS');
  assert.match(await probe(device, machines['a2']!.address, 8080), /^fail/, 'another org on the gateway');
  assert.match(await probe(device, machines['b2']!.address, 8080), /^fail/, 'another org on another host');
  assert.match(await probe(device, hostMeshAddress(a.number), 7001), /^fail/, 'the gateway host itself');
  assert.match(await probe(device, 'fdaa::3', 7001), /^fail/, 'another port at the DNS address');
});
