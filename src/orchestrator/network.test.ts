// Tests machine networking against real network namespaces and veth pairs.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { connect } from 'node:net';
import { randomBytes } from 'node:crypto';
import { access } from 'node:fs/promises';
import {
  setupMachineNetwork, teardownMachineNetwork, listMachineNetworks, netnsName, hostIfName, ensureHostFirewall, firewallRuleset, nftApply, FIREWALL_TABLE,
} from './network.ts';
import { waitFor } from '../../test/helpers/wait.ts';

const skip = process.getuid?.() !== 0 ? 'needs root to create network namespaces' : false;

const exists = (p: string) => access(p).then(() => true, () => false);

/** Reads what a TCP server at [address]:port sends, retrying until it answers. */
async function readFrom(address: string, port: number, timeoutMs = 5000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<string>((resolve, reject) => {
        const sock = connect({ host: address, port, family: 6 });
        let data = '';
        sock.setEncoding('utf8').on('data', (d: string) => (data += d));
        sock.on('end', () => resolve(data));
        sock.on('error', reject);
      });
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

test('a machine network: namespace, veth, address reachable from the host, loopback inside, idempotent', { skip }, async (t) => {
  const id = randomBytes(7).toString('hex');
  const address = `fdaa:0:7e57:0:${process.pid.toString(16)}:0:1:2`;
  t.after(() => teardownMachineNetwork(id));
  const net = await setupMachineNetwork(id, address);
  assert.equal(net.netnsPath, `/var/run/netns/tm-${id.slice(0, 12)}`);
  assert.equal(net.hostIf, hostIfName(id));
  assert.ok(net.hostIf.length <= 15 && /^tmv[0-9a-f]{10}$/.test(net.hostIf));
  assert.equal(net.address, address);
  assert.ok((await listMachineNetworks()).includes(id.slice(0, 12)));

  // Running it again reuses what is there.
  assert.deepEqual(await setupMachineNetwork(id, address), net);

  const inside = execFileSync('ip', ['-n', netnsName(id), '-6', 'addr', 'show'], { encoding: 'utf8' });
  assert.match(inside, new RegExp(`inet6 ${address}/128 scope global`));
  assert.match(inside, /lo: <LOOPBACK,UP/);
  const route = execFileSync('ip', ['-6', 'route', 'show', `${address}/128`], { encoding: 'utf8' });
  assert.match(route, new RegExp(`dev ${net.hostIf}`));

  // A server inside the namespace answers on the machine's address from the root namespace, and on ::1 inside.
  const server = spawn('nsenter', [`--net=${net.netnsPath}`, 'busybox', 'nc', '-ll', '-p', '7000', '-e', 'echo', 'hello'], { stdio: 'ignore' });
  t.after(() => server.kill('SIGKILL'));
  assert.equal((await readFrom(address, 7000)).trim(), 'hello');
  const viaLoopback = execFileSync('nsenter', [`--net=${net.netnsPath}`, 'busybox', 'nc', '::1', '7000'], { encoding: 'utf8', input: '' });
  assert.equal(viaLoopback.trim(), 'hello');
  server.kill('SIGKILL');

  await teardownMachineNetwork(id);
  await teardownMachineNetwork(id);
  assert.equal(await exists(net.netnsPath), false);
  assert.equal(await exists(`/sys/class/net/${net.hostIf}`), false);
  assert.ok(!(await listMachineNetworks()).includes(id.slice(0, 12)));
});

test('teardown by the namespace stem listMachineNetworks returns removes a leftover', { skip }, async (t) => {
  const id = randomBytes(7).toString('hex');
  t.after(() => teardownMachineNetwork(id));
  const net = await setupMachineNetwork(id, `fdaa:0:7e57:0:${process.pid.toString(16)}:0:2:2`);
  const stem = (await listMachineNetworks()).find((s) => id.startsWith(s));
  assert.ok(stem);
  await teardownMachineNetwork(stem);
  assert.equal(await exists(net.netnsPath), false);
  assert.equal(await exists(`/sys/class/net/${net.hostIf}`), false);
});

test('a bad address is refused with invalid_argument and leaves nothing behind', { skip }, async () => {
  const id = randomBytes(7).toString('hex');
  await assert.rejects(setupMachineNetwork(id, '10.0.0.1; rm -rf /'), { code: 'invalid_argument' });
  assert.ok(!(await listMachineNetworks()).includes(id.slice(0, 12)));
});

const nftTable = () => execFileSync('nft', ['list', 'table', 'inet', FIREWALL_TABLE], { encoding: 'utf8' });

test('the host firewall: one stable table, installed by machine setup, re-applied without duplicating a rule', { skip }, async (t) => {
  const id = randomBytes(7).toString('hex');
  t.after(() => teardownMachineNetwork(id));
  await setupMachineNetwork(id, `fdaa:0:7e57:0:${process.pid.toString(16)}:0:3:2`);
  const before = nftTable();
  for (const chain of ['prerouting', 'input', 'forward']) assert.match(before, new RegExp(`chain ${chain} \\{`));
  await ensureHostFirewall();
  await nftApply(firewallRuleset());
  await nftApply(firewallRuleset());
  const rules = (text: string) => text.split('\n').filter((l) => l.includes('iifname')).length;
  assert.equal(rules(nftTable()), rules(before));
  // Nothing in it names one machine: it needs no update per machine and nothing to remove when machines go.
  assert.doesNotMatch(nftTable(), /tmv[0-9a-f]/);
});

test('on a host that forwards IPv6, machine interfaces still do not reach each other through it', { skip }, async (t) => {
  // A private "host" namespace that forwards, with two machine namespaces behind tmv* veths, like setupMachineNetwork
  // makes them: the root namespace's forwarding setting is left alone.
  const tag = randomBytes(3).toString('hex');
  const [router, a, b] = ['r', 'a', 'b'].map((x) => `tarmac-fwtest-${x}-${tag}`) as [string, string, string];
  const ipc = (...args: string[]) => execFileSync('ip', args, { encoding: 'utf8' });
  t.after(() => {
    for (const ns of [a, b, router]) execFileSync('ip', ['netns', 'del', ns], { stdio: 'ignore' });
  });
  for (const ns of [router, a, b]) ipc('netns', 'add', ns);
  ipc('-n', router, 'link', 'set', 'lo', 'up');
  for (const [ns, addr, link] of [[a, 'fdaa::a', 'tmva'], [b, 'fdaa::b', 'tmvb']] as const) {
    ipc('-n', router, 'link', 'add', link, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns);
    ipc('-n', router, 'link', 'set', link, 'up');
    ipc('-n', router, 'addr', 'add', 'fe80::1/64', 'dev', link, 'nodad');
    ipc('-n', router, 'route', 'add', `${addr}/128`, 'dev', link);
    ipc('-n', ns, 'link', 'set', 'lo', 'up');
    ipc('-n', ns, 'link', 'set', 'eth0', 'up');
    ipc('-n', ns, 'addr', 'add', `${addr}/128`, 'dev', 'eth0', 'nodad');
    ipc('-n', ns, 'route', 'add', 'default', 'via', 'fe80::1', 'dev', 'eth0');
  }
  execFileSync('nsenter', [`--net=/var/run/netns/${router}`, 'sh', '-c', 'echo 1 > /proc/sys/net/ipv6/conf/all/forwarding']);
  const server = spawn('nsenter', [`--net=/var/run/netns/${b}`, 'busybox', 'nc', '-ll', '-p', '7000', '-e', 'echo', 'hello'], { stdio: 'ignore' });
  t.after(() => server.kill('SIGKILL'));
  const fromA = () => new Promise<string>((resolve) => {
    const c = spawn('nsenter', [`--net=/var/run/netns/${a}`, 'busybox', 'nc', '-w', '2', 'fdaa::b', '7000'], { stdio: ['ignore', 'pipe', 'ignore'] });
    let out = '';
    c.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    c.on('close', (code) => resolve(code === 0 ? out.trim() : `failed (${code})`));
  });
  // Control: without the firewall, the forwarding namespace passes A's connection to B.
  await waitFor('A to reach B through the forwarding namespace without the firewall', async () => (await fromA()) === 'hello');
  await nftApply(firewallRuleset(), { netns: `/var/run/netns/${router}` });
  assert.match(await fromA(), /^failed/);
});
