// Health checks on one host: run by the worker against real runc machines, shown in the machine JSON, gating the proxy.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'undici';
import { startRegistry, type TestRegistry } from './helpers/registry.ts';
import { buildAndPushImage } from './helpers/images.ts';
import { startTestHost, type TestHost } from './helpers/host.ts';
import { waitFor } from './helpers/wait.ts';
import type { MachineConfig, MachineResponse } from '../src/client/index.ts';
import { machineDetails } from '../src/cli/format.ts';

const checkName = 'servicecheck-00-http-8080';

/**
 * busybox httpd on 8080 answering its hostname and logging each request; /health.txt exists when HEALTHY is set;
 * /cgi-bin/sick and /cgi-bin/heal remove and restore it.
 */
function healthImage(registryHost: string): Promise<string> {
  const cgi = (action: string) => ['#!/bin/sh', action, 'printf "Content-Type: text/plain\\r\\n\\r\\ndone\\n"', ''].join('\n');
  return buildAndPushImage(registryHost, 'health', {
    files: {
      'var/www/cgi-bin/sick': cgi('rm -f /var/www/health.txt'),
      'var/www/cgi-bin/heal': cgi('echo ok > /var/www/health.txt'),
    },
    cmd: ['sh', '-c', 'hostname > /var/www/index.html; [ -n "$HEALTHY" ] && echo ok > /var/www/health.txt; exec httpd -f -vv -p 8080 -h /var/www'],
  });
}

function web(image: string, healthy: boolean): MachineConfig {
  return {
    image,
    env: healthy ? { HEALTHY: '1' } : {},
    services: [{
      protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }], autostart: false,
      checks: [{ type: 'http', path: '/health.txt', interval: '200ms', timeout: '1s' }],
    }],
  };
}

async function get(h: TestHost, app: string): Promise<{ status: number; body: string }> {
  const res = await request(`${h.proxyUrl}/`, { headers: { host: `${app}.localhost` } });
  return { status: res.statusCode, body: (await res.body.text()).trim() };
}

/** Calls a CGI script of the machine on its private address, as the worker's checks reach it. */
async function machineCgi(m: MachineResponse, script: string): Promise<void> {
  const res = await request(`http://[${m.private_ip}]:8080/cgi-bin/${script}`);
  assert.equal(res.statusCode, 200);
  await res.body.text();
}

async function checkStatus(h: TestHost, app: string, id: string): Promise<string | undefined> {
  return (await h.client.getMachine(app, id)).checks?.find((c) => c.name === checkName)?.status;
}

describe('health checks', () => {
  let registry: TestRegistry;
  let h: TestHost;
  let image: string;

  before(async () => {
    registry = await startRegistry();
    image = await healthImage(registry.host);
    h = await startTestHost();
  });
  after(async () => {
    await h?.close();
    await registry?.stop();
  });

  test('a started machine gets traffic only once its service check passes', async () => {
    await h.client.createApp({ app_name: 'gated', org_slug: 'personal' });
    const m = await h.client.createMachine('gated', { config: web(image, false) });
    await h.client.waitMachine('gated', m.id, { state: 'started', timeout: 60 });
    // The worker has probed it and found it failing: started, yet not routed.
    await waitFor('the failing check result', async () => (await checkStatus(h, 'gated', m.id)) === 'critical');
    const shown = await h.client.getMachine('gated', m.id);
    assert.equal(shown.state, 'started');
    const check = shown.checks?.find((c) => c.name === checkName);
    assert.match(check?.output ?? '', /^HTTP GET http:\/\/\[fdaa:[0-9a-f:]+\]:8080\/health\.txt: /, 'the output says what was probed');
    assert.ok(!Number.isNaN(Date.parse(check?.updated_at ?? '')));
    assert.match(machineDetails(shown, { color: false }), new RegExp(`^Checks +${checkName} critical$`, 'm'), 'tarmac machine status shows it');
    assert.equal((await get(h, 'gated')).status, 503, 'a machine whose check fails gets no traffic');

    await machineCgi(m, 'heal');
    await waitFor('the check to pass', async () => (await checkStatus(h, 'gated', m.id)) === 'passing');
    await waitFor('the machine to serve', async () => (await get(h, 'gated')).body === m.id);
    await h.client.deleteApp('gated');
  });

  test('a machine whose check starts failing leaves routing while the other keeps serving', async () => {
    await h.client.createApp({ app_name: 'pair', org_slug: 'personal' });
    const [sick, well] = await Promise.all([1, 2].map(() => h.client.createMachine('pair', { config: web(image, true) })));
    for (const m of [sick!, well!]) await h.client.waitMachine('pair', m.id, { state: 'started', timeout: 60 });
    const seen = new Set<string>();
    await waitFor('both machines to serve', async () => {
      seen.add((await get(h, 'pair')).body);
      return seen.has(sick!.id) && seen.has(well!.id);
    });

    await machineCgi(sick!, 'sick');
    await waitFor('the check to fail', async () => (await checkStatus(h, 'pair', sick!.id)) === 'critical');
    await waitFor('the failing machine to leave routing', () => !h.host.proxy!.routes.apps.get('pair')?.backends.some((b) => b.machineId === sick!.id));
    for (let i = 0; i < 10; i++) {
      const r = await get(h, 'pair');
      assert.equal(r.status, 200);
      assert.equal(r.body, well!.id);
    }
    assert.equal(await checkStatus(h, 'pair', well!.id), 'passing');
    assert.equal((await h.client.getMachine('pair', sick!.id)).state, 'started', 'a failing check does not stop the machine');

    await machineCgi(sick!, 'heal');
    await waitFor('the healed machine to serve again', async () => (await get(h, 'pair')).body === sick!.id);
    await h.client.deleteApp('pair');
  });

  test('check results are written only when they change', async () => {
    await h.client.createApp({ app_name: 'steady', org_slug: 'personal' });
    const m = await h.client.createMachine('steady', { config: web(image, true) });
    await h.client.waitMachine('steady', m.id, { state: 'started', timeout: 60 });
    await waitFor('the check to pass', async () => (await checkStatus(h, 'steady', m.id)) === 'passing');
    const writes: string[] = [];
    const unsubscribe = h.host.catalog.subscribe((b) => {
      for (const c of b.changes) if (c.kind === 'machine_status' && c.key === m.id) writes.push(c.value?.checks?.[0]?.status ?? '');
    });
    try {
      // The machine's httpd logs every probe: five more passing ones write nothing.
      const probes = async () => {
        let n = 0;
        for await (const l of h.client.logs('steady')) if (l.message.includes('url:/health.txt')) n++;
        return n;
      };
      const seen = await probes();
      await waitFor('five more probes', async () => (await probes()) >= seen + 5);
      assert.deepEqual(writes, [], 'repeated passing results write nothing');
      await machineCgi(m, 'sick');
      await waitFor('the check to fail', async () => (await checkStatus(h, 'steady', m.id)) === 'critical');
      assert.deepEqual(writes, ['critical'], 'one status write for one change');
    } finally {
      unsubscribe();
    }
    await h.client.deleteApp('steady');
  });
});
