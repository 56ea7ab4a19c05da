// Tests machine networking against real network namespaces and veth pairs.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { connect } from 'node:net';
import { randomBytes } from 'node:crypto';
import { access } from 'node:fs/promises';
import { setupMachineNetwork, teardownMachineNetwork, listMachineNetworks, netnsName, hostIfName } from './network.ts';

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
