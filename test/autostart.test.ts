// auto_start_machines and auto_stop_machines on one host: the proxy starts stopped runc machines on demand and stops idle ones.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'undici';
import { startRegistry, type TestRegistry } from './helpers/registry.ts';
import { buildAndPushImage } from './helpers/images.ts';
import { startTestHost, type TestHost } from './helpers/host.ts';
import { waitFor } from './helpers/wait.ts';
import type { MachineConfig, MachineResponse } from '../src/client/index.ts';

type Service = NonNullable<MachineConfig['services']>[number];

/**
 * busybox httpd on 8080 answering its hostname, after `delay` seconds; /cgi-bin/hold answers once /tmp/go exists,
 * /cgi-bin/go creates it.
 */
function holdImage(registryHost: string, delay = 0): Promise<string> {
  const cgi = (...lines: string[]) => ['#!/bin/sh', ...lines, 'printf "Content-Type: text/plain\\r\\n\\r\\n"; hostname', ''].join('\n');
  return buildAndPushImage(registryHost, delay ? 'slow' : 'hold', {
    files: {
      'var/www/cgi-bin/hold': cgi('while [ ! -f /tmp/go ]; do sleep 1; done'),
      'var/www/cgi-bin/go': cgi('echo > /tmp/go'),
    },
    cmd: ['sh', '-c', `sleep ${delay}; hostname > /var/www/index.html; exec httpd -f -p 8080 -h /var/www`],
  });
}

function web(image: string, service: Partial<Service> = {}): MachineConfig {
  return { image, services: [{ protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }], ...service }] };
}

async function get(h: TestHost, app: string, path = '/'): Promise<{ status: number; body: string }> {
  const res = await request(`${h.proxyUrl}${path}`, { headers: { host: `${app}.localhost` } });
  return { status: res.statusCode, body: (await res.body.text()).trim() };
}

async function states(h: TestHost, app: string): Promise<Map<string, string>> {
  return new Map((await h.client.listMachines(app)).map((m) => [m.id, m.state]));
}

function count(s: Map<string, string>, state: string): number {
  return [...s.values()].filter((x) => x === state).length;
}

/** Machines created stopped (skip_launch), as the worker reports them. */
async function stoppedMachines(h: TestHost, app: string, n: number, config: MachineConfig): Promise<MachineResponse[]> {
  await h.client.createApp({ app_name: app, org_slug: 'personal' });
  const ms = await Promise.all(Array.from({ length: n }, () => h.client.createMachine(app, { config, skip_launch: true })));
  for (const m of ms) await h.client.waitMachine(app, m.id, { state: 'stopped', timeout: 30 });
  return ms;
}

describe('autostart and autostop', () => {
  let registry: TestRegistry;
  let h: TestHost;
  let image: string;

  before(async () => {
    registry = await startRegistry();
    image = await holdImage(registry.host);
    h = await startTestHost({ config: { proxy: { http: { host: '127.0.0.1', port: 0 }, autostop_idle_ms: 1000 } } });
  });
  after(async () => {
    await h?.close();
    await registry?.stop();
  });

  test('a request for an app with no started machine starts a stopped one and is served by it', async () => {
    const [m] = await stoppedMachines(h, 'wake', 1, web(image));
    const r = await get(h, 'wake');
    assert.equal(r.status, 200, r.body);
    assert.equal(r.body, m!.id);
    assert.equal((await h.client.getMachine('wake', m!.id)).state, 'started');
    const start = (await h.client.listEvents('wake', m!.id)).find((e) => e.type === 'start' && e.request?.['autostart'] === true);
    assert.ok(start, 'the start is recorded as an autostart');
    await h.client.deleteApp('wake');
  });

  test('an autostarted machine whose app listens a moment after it starts serves the first request', async () => {
    const slow = await holdImage(registry.host, 1);
    const [m] = await stoppedMachines(h, 'slow', 1, web(slow));
    const r = await get(h, 'slow');
    assert.equal(r.status, 200, r.body);
    assert.equal(r.body, m!.id);
    await h.client.deleteApp('slow');
  });

  test('a burst of requests starts one machine when one suffices', async () => {
    await stoppedMachines(h, 'burst', 3, web(image));
    const answers = await Promise.all(Array.from({ length: 10 }, () => get(h, 'burst')));
    assert.deepEqual(answers.map((a) => a.status), Array(10).fill(200));
    const served = new Set(answers.map((a) => a.body));
    assert.equal(served.size, 1, `one machine served the whole burst: ${[...served].join(', ')}`);
    const s = await states(h, 'burst');
    assert.equal(count(s, 'started'), 1);
    assert.equal(count(s, 'stopped'), 2);
    assert.equal(s.get([...served][0]!), 'started');
    await h.client.deleteApp('burst');
  });

  test('a machine with autostart false is not started: the request gets a 503', async () => {
    await stoppedMachines(h, 'nostart', 1, web(image, { autostart: false }));
    const r = await get(h, 'nostart');
    assert.equal(r.status, 503);
    assert.equal(count(await states(h, 'nostart'), 'stopped'), 1);
    await h.client.deleteApp('nostart');
  });

  test('when every started machine is past its soft limit, a stopped one is started', async () => {
    const config = web(image, { concurrency: { type: 'requests', soft_limit: 1, hard_limit: 10 } });
    await h.client.createApp({ app_name: 'grow', org_slug: 'personal' });
    const busy = await h.client.createMachine('grow', { config });
    await h.client.waitMachine('grow', busy.id, { state: 'started', timeout: 60 });
    const spare = await h.client.createMachine('grow', { config, skip_launch: true });
    await h.client.waitMachine('grow', spare.id, { state: 'stopped', timeout: 30 });
    await waitFor('the started machine to serve', async () => (await get(h, 'grow')).body === busy.id);

    // One request held on the started machine puts it at its soft limit; the next one asks for more capacity.
    const held = get(h, 'grow', '/cgi-bin/hold');
    await waitFor('the held request to be in flight', () => h.host.proxy!.routes.apps.get('grow')?.backends[0]?.inflight === 1);
    const r = await get(h, 'grow');
    assert.equal(r.status, 200);
    await h.client.waitMachine('grow', spare.id, { state: 'started', timeout: 60 });
    await waitFor('the started spare to serve', async () => (await get(h, 'grow')).body === spare.id);

    const go = await request(`http://[${busy.private_ip}]:8080/cgi-bin/go`);
    await go.body.text();
    assert.equal((await held).body, busy.id);
    await h.client.deleteApp('grow');
  });

  test('idle machines with autostop are stopped down to min_machines_running', async () => {
    await h.client.createApp({ app_name: 'idle', org_slug: 'personal' });
    const config = web(image, { autostop: 'stop', min_machines_running: 1 });
    const ms = await Promise.all([1, 2, 3].map(() => h.client.createMachine('idle', { config })));
    for (const m of ms) await h.client.waitMachine('idle', m.id, { state: 'started', timeout: 60 });
    const s = await waitFor('two idle machines to be stopped', async () => {
      const st = await states(h, 'idle');
      return count(st, 'stopped') === 2 ? st : undefined;
    }, 30_000);
    assert.equal(count(s, 'started'), 1, 'min_machines_running keeps one started');
    const running = [...s].find(([, state]) => state === 'started')![0];
    const r = await get(h, 'idle');
    assert.equal(r.body, running, 'the machine kept running serves');
    const stopped = [...s].find(([, state]) => state === 'stopped')![0];
    assert.ok((await h.client.listEvents('idle', stopped)).some((e) => e.type === 'stop' && e.request?.['autostop'] === true));
    await h.client.deleteApp('idle');
  });

  test('autostop true with no minimum stops every idle machine, and a request starts one again', async () => {
    await h.client.createApp({ app_name: 'nap', org_slug: 'personal' });
    const m = await h.client.createMachine('nap', { config: web(image, { autostop: true }) });
    await h.client.waitMachine('nap', m.id, { state: 'started', timeout: 60 });
    await h.client.waitMachine('nap', m.id, { state: 'stopped', timeout: 30 });
    const r = await get(h, 'nap');
    assert.equal(r.body, m.id);
    assert.equal((await h.client.getMachine('nap', m.id)).state, 'started');
    await h.client.deleteApp('nap');
  });
});
