// Machine isolation with real traffic: machines reach no host port, no machine of another org, and cannot spoof their address.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:net';
import { createSocket, type Socket } from 'node:dgram';
import { networkInterfaces } from 'node:os';
import { execFile, execFileSync } from 'node:child_process';
import { promisify } from 'node:util';
import { readFile, access } from 'node:fs/promises';
import { request } from 'undici';
import { startRegistry, type TestRegistry } from './helpers/registry.ts';
import { buildAndPushImage } from './helpers/images.ts';
import { startTestHost, type TestHost } from './helpers/host.ts';
import { haveCommand, missingPrerequisites } from './helpers/rootfs.ts';
import { waitFor } from './helpers/wait.ts';
import type { MachineResponse as Machine, MachineConfig } from '../src/client/index.ts';
import { netnsName, hostIfName, FIREWALL_TABLE } from '../src/orchestrator/network.ts';

const exec = promisify(execFile);

const whyNot = () => missingPrerequisites('namespaces, nftables', ['runc', 'conmon', 'nft', 'nsenter', 'umoci', 'skopeo']);
const haveRunsc = haveCommand('runsc');

const exists = (p: string) => access(p).then(() => true, () => false);

/**
 * The machine's command: serve :8080 in the background, then try every `name=address,port,tries` in $PROBES at once
 * with busybox nc (an HTTP request; every target answers one) and log `probe NAME REACHED|BLOCKED`, then `probes done`.
 */
const probeScript = [
  'httpd -p 8080 -h /var/www',
  // REACHED only when an answer came back: under runsc (2022-12 build) nc's exit status alone was seen to be 0 for a
  // connect that could not have succeeded (twice in ~10 runs, not reproduced in isolation), so data must flow.
  'probe() { i=0; while [ $i -lt "$4" ]; do if [ -n "$(printf \'GET / HTTP/1.0\\r\\n\\r\\n\' | nc -w 1 "$2" "$3" 2>/dev/null)" ]; then echo "probe $1 REACHED"; return; fi; i=$((i+1)); sleep 0.2; done; echo "probe $1 BLOCKED"; }',
  'eval "set -- $PROBES"',
  'for p in "$@"; do n=${p%%=*}; r=${p#*=}; a=${r%%,*}; r=${r#*,}; probe "$n" "$a" "${r%%,*}" "${r#*,}" & done',
  'wait',
  'echo "probes done"',
  'exec sleep 600',
].join('\n');

/** The host's own addresses other machines' traffic could aim at (not loopback, not link-local, not machine veths). */
function hostAddresses(): { v6: string[]; v4: string[] } {
  const v6: string[] = [];
  const v4: string[] = [];
  for (const [name, addrs] of Object.entries(networkInterfaces())) {
    if (name.startsWith('tmv')) continue;
    for (const a of addrs ?? []) {
      if (a.internal) continue;
      if (a.family === 'IPv6' && !a.address.startsWith('fe80:')) v6.push(a.address);
      if (a.family === 'IPv4') v4.push(a.address);
    }
  }
  return { v6, v4 };
}

async function logLines(h: TestHost, app: string, machineId: string): Promise<string[]> {
  const out: string[] = [];
  for await (const l of h.client.logs(app, { machine_id: machineId })) out.push(l.message);
  return out;
}

/** Probe results a machine logged, once it logged them all: name → REACHED | BLOCKED. */
async function probeResults(h: TestHost, app: string, machineId: string): Promise<Record<string, string>> {
  const lines = await waitFor(`machine ${machineId} to finish its probes`, async () => {
    const l = await logLines(h, app, machineId);
    return l.includes('probes done') ? l : undefined;
  }, 30_000);
  const out: Record<string, string> = {};
  for (const l of lines) {
    const m = /^probe (\S+) (REACHED|BLOCKED)$/.exec(l);
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}

/**
 * Sends UDP datagrams from inside machine `id`'s network namespace (a node process entered there), one after the
 * other in order: `from` is the source address (bound; it must be on the machine's interface), `fromPort` its port.
 */
async function udpFromMachine(id: string, sends: Array<{ from: string; fromPort: number; to: string; port: number; text: string }>): Promise<void> {
  const code = `
    const dgram = require('node:dgram');
    const sends = JSON.parse(process.argv[1]);
    (async () => {
      for (const s of sends) {
        const sock = dgram.createSocket(s.from.includes(':') ? 'udp6' : 'udp4');
        await new Promise((resolve, reject) => sock.once('error', reject).bind(s.fromPort, s.from, resolve));
        await new Promise((resolve, reject) => sock.send(s.text, s.port, s.to, (e) => (e ? reject(e) : resolve())));
        sock.close();
      }
    })().catch((e) => { console.error(e.message); process.exit(1); });`;
  await exec('nsenter', [`--net=/var/run/netns/${netnsName(id)}`, process.execPath, '-e', code, JSON.stringify(sends)]);
}

const ip = (...args: string[]) => execFileSync('ip', args, { encoding: 'utf8' });

describe('machine isolation', { skip: whyNot() }, () => {
  let registry: TestRegistry;
  let image: string;
  let h: TestHost;
  let listener: Server;
  let listenPort = 0;
  /** Remote addresses of every connection the host listener accepted. */
  const accepted: string[] = [];
  const machineIds: string[] = [];

  before(async () => {
    registry = await startRegistry();
    image = await buildAndPushImage(registry.host, 'probe', { files: { 'var/www/index.html': 'probe\n' }, cmd: ['sleep', '600'] });
    h = await startTestHost();
    await h.host.catalog.putOrg({ slug: 'acme', name: 'Acme', network_id: await h.host.catalog.allocateNetworkNumber(), created_at: new Date().toISOString() });
    // Something the host listens on at every address: machines must not reach it.
    listener = createServer((s) => {
      accepted.push(s.remoteAddress ?? '?');
      s.end('host secret\n');
    });
    await new Promise<void>((resolve) => listener.listen(0, '::', resolve));
    listenPort = (listener.address() as { port: number }).port;
  });
  after(async () => {
    listener?.close();
    await h?.close();
    await registry?.stop();
    for (const id of machineIds) {
      assert.equal(await exists(`/var/run/netns/${netnsName(id)}`), false, `namespace of ${id} removed`);
      assert.equal(await exists(`/sys/class/net/${hostIfName(id)}`), false, `interface of ${id} removed`);
    }
    // The host firewall stays as one stable table with no per-machine rule: nothing names a machine interface.
    const table = execFileSync('nft', ['list', 'table', 'inet', FIREWALL_TABLE], { encoding: 'utf8' });
    assert.doesNotMatch(table, /tmv[0-9a-f]/);
  });

  async function machine(app: string, config: Partial<MachineConfig>, runtime?: string): Promise<Machine> {
    const m = await h.client.createMachine(app, {
      config: {
        image,
        init: { cmd: ['sh', '-c', probeScript] },
        services: [{ protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }] }],
        ...(runtime ? { metadata: { tarmac_runtime: runtime } } : {}),
        ...config,
      },
    });
    machineIds.push(m.id);
    await h.client.waitMachine(app, m.id, { state: 'started', timeout: 60 });
    return m;
  }

  /** The host itself reaches a machine's :8080 on its private address (the proxy's path). */
  async function hostReaches(m: Machine): Promise<boolean> {
    return waitFor(`the host to reach ${m.id}`, async () => {
      const r = await request(`http://[${m.private_ip}]:8080/`, { headersTimeout: 2000 });
      return (await r.body.text()).trim() === 'probe' && r.statusCode === 200;
    });
  }

  test('a machine reaches its org\'s machines on the host and nothing else: no port of the host, no other org; the host reaches them all', async () => {
    await h.client.createApp({ app_name: 'iso-a', org_slug: 'personal' });
    await h.client.createApp({ app_name: 'iso-b', org_slug: 'personal' });
    await h.client.createApp({ app_name: 'iso-x', org_slug: 'acme' });
    // Targets first: a machine of the same app, one of another app of the org, one of another org.
    const [sameApp, sameOrg, otherOrg] = await Promise.all([
      machine('iso-a', { env: { PROBES: '' } }),
      machine('iso-b', { env: { PROBES: '' } }),
      machine('iso-x', { env: { PROBES: '' } }),
    ]);
    const apiPort = new URL(h.host.apiUrl!).port;
    const proxyPort = String(h.host.proxy!.address.port);
    const { v6, v4 } = hostAddresses();
    assert.ok(v6.length + v4.length > 0, 'the host has an address besides loopback');
    // Control: the host listener answers on each of the host's addresses (from the host).
    for (const a of [...v6, ...v4]) {
      const { stdout } = await exec('busybox', ['nc', '-w', '2', a, String(listenPort)], { timeout: 5000 });
      assert.equal(stdout.trim(), 'host secret', `the listener answers on ${a}`);
    }
    const hostConns = accepted.length;
    const probes = [
      'self=$FLY_PRIVATE_IP,8080,10', // control: the probe itself works
      `api=127.0.0.1,${apiPort},1`,
      `api6=::1,${apiPort},1`,
      `proxy=127.0.0.1,${proxyPort},1`,
      `gateway=fe80::1%eth0,${listenPort},1`,
      `gateway-api=fe80::1%eth0,${apiPort},1`,
      ...v6.map((a, i) => `host6-${i}=${a},${listenPort},1`),
      ...v4.map((a, i) => `host4-${i}=${a},${listenPort},1`),
      `same-app=${sameApp.private_ip},8080,1`,
      `same-org=${sameOrg.private_ip},8080,1`,
      `other-org=${otherOrg.private_ip},8080,1`,
    ];
    // $FLY_PRIVATE_IP is expanded by the machine's shell (eval), from its own env.
    const env = { PROBES: probes.join(' ') };
    const probers = [{ name: 'runc', m: await machine('iso-a', { env: { ...env } }) }];
    if (haveRunsc) probers.push({ name: 'runsc', m: await machine('iso-a', { env: { ...env } }, 'runsc') });

    for (const { name, m } of probers) {
      const results = await probeResults(h, 'iso-a', m.id);
      const expected: Record<string, string> = {};
      for (const p of probes) expected[p.split('=')[0]!] = 'BLOCKED';
      expected['self'] = 'REACHED';
      // One organization's machines on a host are one network (without the mesh too); other orgs stay apart.
      expected['same-app'] = 'REACHED';
      expected['same-org'] = 'REACHED';
      assert.deepEqual(results, expected, `${name} machine ${m.id}: ${JSON.stringify(results)}`);
    }
    assert.deepEqual(accepted.slice(hostConns), [], 'the host listener accepted no connection from a machine');

    // The other direction works: the host reaches every machine, and the proxy serves them.
    for (const m of [sameApp, sameOrg, otherOrg, ...probers.map((p) => p.m)]) assert.ok(await hostReaches(m));
    const viaProxy = await request(h.proxyUrl, { headers: { host: 'iso-x.localhost' } });
    assert.equal(viaProxy.statusCode, 200);
    assert.equal((await viaProxy.body.text()).trim(), 'probe');

    for (const app of ['iso-a', 'iso-b', 'iso-x']) await h.client.deleteApp(app);
  });

  test('DNS: a machine reaches the host resolver at [fdaa::3]:53 (UDP and TCP) and no other port of that address', async () => {
    await waitFor('the DNS server on fdaa::3', () => h.host.dns!.listening().some((l) => l.host === 'fdaa::3'), 120_000);
    await h.client.createApp({ app_name: 'iso-dns', org_slug: 'personal' });
    const apiPort = new URL(h.host.apiUrl!).port;
    const hostConns = accepted.length;
    // UDP: the machine's resolver (busybox nslookup, /etc/resolv.conf) finds its own address. TCP: a raw DNS/TCP
    // frame (length, header, question iso-dns.internal AAAA) sent with nc gets an answer that echoes the question.
    const frame = ['\\000\\042\\000\\001\\001\\000\\000\\001\\000\\000\\000\\000\\000\\000', '\\007iso-dns\\010internal\\000', '\\000\\034\\000\\001'].join('');
    const lookup = 'i=0; until nslookup -type=aaaa iso-dns.internal 2>&1 | grep -q "$FLY_PRIVATE_IP"; do i=$((i+1)); [ $i -gt 100 ] && break; sleep 0.2; done;'
      + ' if [ $i -le 100 ]; then echo "probe dns-udp REACHED"; else echo "probe dns-udp BLOCKED"; fi;'
      + ` if printf "${frame}" | nc -w 2 fdaa::3 53 | grep -q iso-dns; then echo "probe dns-tcp REACHED"; else echo "probe dns-tcp BLOCKED"; fi`;
    const m = await machine('iso-dns', {
      init: { cmd: ['sh', '-c', `${lookup}\n${probeScript}`] },
      env: { PROBES: [`dns-listener=fdaa::3,${listenPort},1`, `dns-api=fdaa::3,${apiPort},1`, 'dns-4280=fdaa::3,4280,1'].join(' ') },
    });
    const results = await probeResults(h, 'iso-dns', m.id);
    assert.deepEqual(results, { 'dns-udp': 'REACHED', 'dns-tcp': 'REACHED', 'dns-listener': 'BLOCKED', 'dns-api': 'BLOCKED', 'dns-4280': 'BLOCKED' });
    assert.deepEqual(accepted.slice(hostConns), [], 'the host listener on every address accepted nothing at fdaa::3');
    await h.client.deleteApp('iso-dns');
  });

  test('spoofing: what a machine sends from an address not its own is dropped, even into another machine\'s open flow', async () => {
    await h.client.createApp({ app_name: 'spoof', org_slug: 'personal' });
    const [attacker, victim] = await Promise.all([machine('spoof', { env: { PROBES: '' } }), machine('spoof', { env: { PROBES: '' } })]);
    const received: string[] = [];
    const sock: Socket = createSocket({ type: 'udp6' });
    sock.on('message', (msg) => received.push(msg.toString()));
    await new Promise<void>((resolve) => sock.bind(0, '::', resolve));
    const port = sock.address().port;
    try {
      // The host opens a UDP flow to each machine (as the proxy would): their replies into it are accepted.
      const victimPort = 40001;
      const attackerPort = 40002;
      for (const [m, p] of [[victim, victimPort], [attacker, attackerPort]] as const) {
        await new Promise<void>((resolve, reject) => sock.send('hello', p, m.private_ip, (e) => (e ? reject(e) : resolve())));
      }
      // The address the host used towards the machines (the flow's other end).
      const hostAddr = /\bsrc (\S+)/.exec(ip('-6', 'route', 'get', victim.private_ip))?.[1];
      assert.ok(hostAddr, 'the host has a source address towards machines');

      // The attacker takes on the victim's address and an IPv4 address of its own (as a machine with CAP_NET_RAW
      // could forge anyway); its gateway is pinned so it needs no neighbour discovery from the forged address.
      const ns = netnsName(attacker.id);
      const mac = (await readFile(`/sys/class/net/${hostIfName(attacker.id)}/address`, 'utf8')).trim();
      ip('-n', ns, 'addr', 'add', `${victim.private_ip}/128`, 'dev', 'eth0', 'nodad');
      ip('-n', ns, 'neigh', 'replace', 'fe80::1', 'lladdr', mac, 'dev', 'eth0', 'nud', 'permanent');
      const { v4 } = hostAddresses();
      if (v4.length > 0) {
        ip('-n', ns, 'addr', 'add', '198.51.100.7/32', 'dev', 'eth0');
        ip('-n', ns, 'route', 'add', `${v4[0]}/32`, 'dev', 'eth0');
      }

      await udpFromMachine(attacker.id, [
        // Forged: the victim's address, into the victim's flow with the host.
        { from: victim.private_ip, fromPort: victimPort, to: hostAddr, port, text: 'forged-into-victim-flow' },
        // IPv4 from a machine (machines have none), straight to the host's socket.
        ...(v4.length > 0 ? [{ from: '198.51.100.7', fromPort: 40003, to: v4[0]!, port, text: 'ipv4-from-machine' }] : []),
        // Its own address, but not a reply: a new flow to the host.
        { from: attacker.private_ip, fromPort: 40004, to: hostAddr, port, text: 'new-flow-to-host' },
        // Control, last: its own address, replying into its own flow.
        { from: attacker.private_ip, fromPort: attackerPort, to: hostAddr, port, text: 'attacker-reply' },
      ]);
      // Control: the victim's real reply into its flow is accepted.
      await udpFromMachine(victim.id, [{ from: victim.private_ip, fromPort: victimPort, to: hostAddr, port, text: 'victim-reply' }]);
      await waitFor('both genuine replies', () => received.length >= 2);
      // Everything the attacker sent went out before its genuine reply: had any been accepted, it would be here first.
      assert.deepEqual(received, ['attacker-reply', 'victim-reply']);
    } finally {
      sock.close();
    }
    await h.client.deleteApp('spoof');
  });
});
