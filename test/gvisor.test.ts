// gVisor machines end to end: created through the API, served through the proxy, stopped, started, destroyed, no leaks.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, readdir, access } from 'node:fs/promises';
import { request } from 'undici';
import { startRegistry, type TestRegistry } from './helpers/registry.ts';
import { buildAndPushImage } from './helpers/images.ts';
import { startTestHost, mounts, type TestHost } from './helpers/host.ts';
import { missingPrerequisites } from './helpers/rootfs.ts';
import { waitFor } from './helpers/wait.ts';
import type { MachineConfig } from '../src/client/index.ts';

const whyNot = () => missingPrerequisites('namespaces, mounts, cgroups', ['runsc', 'runc', 'conmon', 'umoci', 'skopeo']);

const exists = (p: string) => access(p).then(() => true, () => false);
const hostKernel = (await readFile('/proc/version', 'utf8')).trim();

/** What the image serves at /cgi-bin/kernel: the kernel the machine sees, and the first line of its dmesg. */
const kernelCgi = [
  '#!/bin/sh',
  'printf "Content-Type: text/plain\\r\\n\\r\\n"',
  'echo "version=$(cat /proc/version)"',
  'echo "dmesg=$(dmesg 2>&1 | head -n 1)"',
  '',
].join('\n');
/** The machine also says which kernel it runs on in its logs, then serves its hostname on :8080. */
const command = 'echo "kernel: $(cat /proc/version)"; hostname > /var/www/index.html; exec httpd -f -p 8080 -h /var/www';

const web = (image: string, runtime?: string, opts: { autostart?: boolean } = {}): MachineConfig => ({
  image,
  services: [{ protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }], ...opts }],
  ...(runtime ? { metadata: { tarmac_runtime: runtime } } : {}),
});

async function get(h: TestHost, app: string, path = '/'): Promise<{ status: number; body: string }> {
  const res = await request(`${h.proxyUrl}${path}`, { headers: { host: `${app}.localhost` } });
  return { status: res.statusCode, body: (await res.body.text()).trim() };
}

/** Kernel facts the (only) machine of `app` reports through the proxy. */
async function kernelOf(h: TestHost, app: string): Promise<{ version: string; dmesg: string }> {
  return waitFor(`app ${app} to report its kernel`, async () => {
    const r = await get(h, app, '/cgi-bin/kernel');
    if (r.status !== 200) return undefined;
    const version = /^version=(.*)$/m.exec(r.body)?.[1] ?? '';
    const dmesg = /^dmesg=(.*)$/m.exec(r.body)?.[1] ?? '';
    return { version, dmesg };
  });
}

/** Asserts the kernel facts are gVisor's (its own /proc/version and its fake boot messages), not the host's. */
function assertGvisor(k: { version: string; dmesg: string }): void {
  assert.notEqual(k.version, hostKernel, 'gVisor shows its own /proc/version, not the host kernel');
  assert.match(k.version, /^Linux version /);
  assert.match(k.dmesg, /Starting gVisor/, 'gVisor prints its fake boot log on dmesg');
}

function assertHostKernel(k: { version: string; dmesg: string }): void {
  assert.equal(k.version, hostKernel, 'runc machines share the host kernel');
  assert.doesNotMatch(k.dmesg, /gVisor/);
}

/** Everything a machine can leave on the host: namespace, mounts, cgroups, runsc state, processes. */
async function leftovers(id: string): Promise<string[]> {
  const found: string[] = [];
  if (await exists(`/var/run/netns/tm-${id.slice(0, 12)}`)) found.push('network namespace');
  const mountinfo = await mounts();
  if (mountinfo.includes(`/machines/${id}/`)) found.push('mount');
  for (const controller of await readdir('/sys/fs/cgroup')) {
    if (await exists(`/sys/fs/cgroup/${controller}/tarmac/${id}`)) found.push(`cgroup ${controller}`);
  }
  for (const root of ['/run/tarmac/runsc', '/run/tarmac/runc']) {
    for (const f of await readdir(root).catch(() => [] as string[])) if (f.startsWith(id)) found.push(`runtime state ${root}/${f}`);
  }
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
    const cmd = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (cmd.includes(id)) found.push(`process ${pid}: ${cmd.split('\0').join(' ').slice(0, 120)}`);
  }
  return found;
}

async function logLines(h: TestHost, app: string, machineId: string): Promise<string[]> {
  const out: string[] = [];
  for await (const l of h.client.logs(app, { machine_id: machineId })) out.push(l.message);
  return out;
}

describe('gVisor', { skip: whyNot() }, () => {
// One registry and one image serve both hosts below.
let registry: TestRegistry;
let image: string;
before(async () => {
  registry = await startRegistry();
  image = await buildAndPushImage(registry.host, 'kernel', { files: { 'var/www/cgi-bin/kernel': kernelCgi }, cmd: ['sh', '-c', command] });
});
after(async () => {
  await registry?.stop();
});

describe('gVisor machines', () => {
  let h: TestHost;

  before(async () => {
    h = await startTestHost();
  });
  after(async () => {
    await h?.close();
  });

  test('a runsc machine: API, proxy, logs, stop and start, destroy, nothing left', async () => {
    await h.client.createApp({ app_name: 'visor', org_slug: 'personal' });
    // Without autostart, so that a request to the stopped machine below does not start it again.
    const m = await h.client.createMachine('visor', { config: web(image, 'runsc', { autostart: false }) });
    await h.client.waitMachine('visor', m.id, { state: 'started', timeout: 60 });
    await waitFor('the gVisor machine to serve through the proxy', async () => (await get(h, 'visor')).body === m.id);
    assertGvisor(await kernelOf(h, 'visor'));
    const lines = await waitFor('the kernel line in the logs', async () => {
      const l = await logLines(h, 'visor', m.id);
      return l.some((x) => x.startsWith('kernel: ')) ? l : undefined;
    });
    assert.notEqual(lines.find((x) => x.startsWith('kernel: ')), `kernel: ${hostKernel}`);
    // The leak check below sees a running sandbox's traces (so its empty answer later means something).
    const traces = (await leftovers(m.id)).join('\n');
    for (const what of ['network namespace', 'mount', 'cgroup memory', 'cgroup pids', 'runtime state /run/tarmac/runsc/', 'process ']) {
      assert.ok(traces.includes(what), `a running gVisor machine shows its ${what}: ${traces}`);
    }

    await h.client.stopMachine('visor', m.id, { timeout: 10 });
    await h.client.waitMachine('visor', m.id, { state: 'stopped', timeout: 30 });
    assert.equal((await get(h, 'visor')).status, 503);
    assert.equal((await h.client.getMachine('visor', m.id)).state, 'stopped', 'the request did not start it');
    // A stopped machine keeps its network, nothing else: no sandbox, cgroup, mount or runsc state.
    assert.deepEqual((await leftovers(m.id)).filter((x) => x !== 'network namespace'), []);

    await h.client.startMachine('visor', m.id);
    await h.client.waitMachine('visor', m.id, { state: 'started', timeout: 60 });
    await waitFor('the gVisor machine to serve again', async () => (await get(h, 'visor')).body === m.id);
    assertGvisor(await kernelOf(h, 'visor'));
    await waitFor('a second kernel line in the logs after the start', async () =>
      (await logLines(h, 'visor', m.id)).filter((x) => x.startsWith('kernel: ')).length >= 2);

    await h.client.deleteMachine('visor', m.id, { force: true });
    await h.client.waitMachine('visor', m.id, { state: 'destroyed', timeout: 30 });
    await h.host.orchestrator?.idle();
    assert.deepEqual(await leftovers(m.id), []);
    await h.client.deleteApp('visor');
  });

  test('a runc machine and a runsc machine of one app both serve, each on its own kernel', async () => {
    await h.client.createApp({ app_name: 'mixed', org_slug: 'personal' });
    const [plain, visor] = await Promise.all([
      h.client.createMachine('mixed', { config: web(image) }),
      h.client.createMachine('mixed', { config: web(image, 'runsc') }),
    ]);
    await Promise.all([plain, visor].map((m) => h.client.waitMachine('mixed', m!.id, { state: 'started', timeout: 60 })));
    const seen = new Set<string>();
    await waitFor('both machines to answer through the proxy', async () => {
      const r = await get(h, 'mixed');
      if (r.status === 200) seen.add(r.body);
      return seen.size === 2;
    });
    assert.deepEqual([...seen].sort(), [plain!.id, visor!.id].sort());
    // Each machine tells its kernel in its own logs.
    const kernelLine = (id: string) => waitFor(`machine ${id}'s kernel line`, async () => (await logLines(h, 'mixed', id)).find((l) => l.startsWith('kernel: ')));
    assert.equal(await kernelLine(plain!.id), `kernel: ${hostKernel}`);
    assert.notEqual(await kernelLine(visor!.id), `kernel: ${hostKernel}`);
    // And directly on their private addresses, the cgi tells the same.
    const direct = async (ip: string) => {
      const r = await request(`http://[${ip}]:8080/cgi-bin/kernel`);
      const body = await r.body.text();
      return { version: /^version=(.*)$/m.exec(body)?.[1] ?? '', dmesg: /^dmesg=(.*)$/m.exec(body)?.[1] ?? '' };
    };
    assertHostKernel(await direct(plain!.private_ip));
    assertGvisor(await direct(visor!.private_ip));

    await h.client.deleteApp('mixed');
    await h.host.orchestrator?.idle();
    for (const m of [plain!, visor!]) assert.deepEqual(await leftovers(m.id), [], `machine ${m.id} left nothing`);
  });
});

describe('a host whose default runtime is runsc', () => {
  let h: TestHost;

  before(async () => {
    h = await startTestHost({ config: { runtime: { default: 'runsc', oci_binary: 'runc' } } });
  });
  after(async () => {
    await h?.close();
  });

  test('machines run under gVisor by default, and under runc when their metadata asks', async () => {
    await h.client.createApp({ app_name: 'dflt', org_slug: 'personal' });
    const m = await h.client.createMachine('dflt', { config: web(image) });
    await h.client.waitMachine('dflt', m.id, { state: 'started', timeout: 60 });
    await waitFor('the machine to serve through the proxy', async () => (await get(h, 'dflt')).body === m.id);
    assertGvisor(await kernelOf(h, 'dflt'));

    await h.client.createApp({ app_name: 'plain', org_slug: 'personal' });
    const r = await h.client.createMachine('plain', { config: web(image, 'runc') });
    await h.client.waitMachine('plain', r.id, { state: 'started', timeout: 60 });
    await waitFor('the runc machine to serve through the proxy', async () => (await get(h, 'plain')).body === r.id);
    assertHostKernel(await kernelOf(h, 'plain'));

    await h.client.deleteApp('dflt');
    await h.client.deleteApp('plain');
    await h.host.orchestrator?.idle();
    for (const id of [m.id, r.id]) assert.deepEqual(await leftovers(id), [], `machine ${id} left nothing`);
  });
});
});
