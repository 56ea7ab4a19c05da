// Tests health check probes and the per-instance check runner against real sockets on loopback.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer as createHttpServer, type Server } from 'node:http';
import { createServer as createTcpServer, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';
import { namedChecks, type CheckStatus, type MachineConfig, type MachineSpec } from '../catalog/index.ts';
import { MachineChecks, probe, sameCheckStatuses } from './checks.ts';
import { freePort } from '../../test/helpers/registry.ts';
import { waitFor } from '../../test/helpers/wait.ts';

function spec(config: MachineConfig): MachineSpec {
  return {
    id: 'm1', app: 'a', name: 'n', region: 'local', host_id: 'h', config, instance_id: 'i1', version: 1, desired: 'started',
    restart_generation: 0, cordoned: false, private_ip: '127.0.0.1', created_at: '', updated_at: '',
  };
}

async function listen(server: Server | ReturnType<typeof createTcpServer>, t: { after(fn: () => unknown): void }): Promise<number> {
  const sockets = new Set<Socket>();
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.after(() => {
    for (const s of sockets) s.destroy();
    return new Promise<void>((r) => server.close(() => r()));
  });
  return (server.address() as AddressInfo).port;
}

test('names checks like Fly: top-level by key, service checks servicecheck-NN-type-port with the internal port', () => {
  const names = namedChecks({
    image: 'x',
    checks: { alive: { type: 'tcp', port: 9000 } },
    services: [
      { protocol: 'tcp', internal_port: 8080, checks: [{ type: 'http', path: '/health' }, { port: 8081 }] },
      { protocol: 'tcp', internal_port: 5432, checks: [{ type: 'tcp' }] },
    ],
  }).map((c) => [c.name, c.type, c.port, c.service]);
  assert.deepEqual(names, [
    ['alive', 'tcp', 9000, undefined],
    ['servicecheck-00-http-8080', 'http', 8080, 0],
    ['servicecheck-01-tcp-8081', 'tcp', 8081, 0],
    ['servicecheck-02-tcp-5432', 'tcp', 5432, 1],
  ]);
});

test('tcp probe passes when a listener accepts, fails on a closed port', async (t) => {
  const port = await listen(createTcpServer((s) => s.end()), t);
  const [ok] = namedChecks({ image: 'x', checks: { c: { type: 'tcp', port } } });
  const pass = await probe(ok!, '127.0.0.1');
  assert.equal(pass.ok, true);
  assert.match(pass.output, /Success/);
  const closed = await freePort();
  const [bad] = namedChecks({ image: 'x', checks: { c: { type: 'tcp', port: closed } } });
  const fail = await probe(bad!, '127.0.0.1');
  assert.equal(fail.ok, false);
  assert.match(fail.output, /ECONNREFUSED/);
});

test('http probe sends method, path and headers; 2xx passes, other statuses and timeouts fail', async (t) => {
  const seen: Array<{ method: string | undefined; url: string | undefined; token: string | undefined }> = [];
  const port = await listen(createHttpServer((req, res) => {
    seen.push({ method: req.method, url: req.url, token: req.headers['x-token'] as string | undefined });
    if (req.url === '/slow') return; // never answers
    res.writeHead(req.url === '/ok' ? 204 : 503).end(req.url === '/ok' ? '' : 'down for maintenance');
  }), t);
  const check = (path: string, timeout = '2s') => namedChecks({
    image: 'x', checks: { h: { type: 'http', port, path, method: 'head', timeout, headers: [{ name: 'X-Token', values: ['s3cret'] }] } },
  })[0]!;
  const ok = await probe(check('/ok'), '127.0.0.1');
  assert.equal(ok.ok, true, ok.output);
  assert.deepEqual(seen[0], { method: 'HEAD', url: '/ok', token: 's3cret' });
  const down = await probe({ ...check('/down'), check: { type: 'http', port, path: '/down' } }, '127.0.0.1');
  assert.equal(down.ok, false);
  assert.match(down.output, /503 Service Unavailable Output: "down for maintenance"/);
  const slow = await probe(check('/slow', '200ms'), '127.0.0.1');
  assert.equal(slow.ok, false);
  assert.match(slow.output, /timed out after 200 ms/);
});

test('a check runner reports warning until the first result, passes, turns critical, and reports only changes', async (t) => {
  let healthy = true;
  const port = await listen(createHttpServer((_req, res) => res.writeHead(healthy ? 200 : 500).end()), t);
  const changes: CheckStatus[][] = [];
  const cfg: MachineConfig = {
    image: 'x',
    services: [{ protocol: 'tcp', internal_port: port, checks: [{ type: 'http', path: '/', interval: '30ms', timeout: '1s' }] }],
  };
  const runner = new MachineChecks(spec(cfg), () => changes.push(runner.results()));
  t.after(() => runner.stop());
  assert.equal(runner.results()[0]!.status, 'warning');
  await waitFor('the check to pass', () => runner.results()[0]!.status === 'passing');
  // Many intervals of the same result make no further change.
  const probesSeen = changes.length;
  healthy = false;
  await waitFor('the check to turn critical', () => runner.results()[0]!.status === 'critical');
  assert.deepEqual(changes.map((c) => c[0]!.status), ['passing', 'critical']);
  assert.equal(probesSeen, 1);
  assert.match(runner.results()[0]!.output, /500/);
  assert.equal(sameCheckStatuses(changes[1], runner.results()), true);
  assert.equal(sameCheckStatuses(changes[0], runner.results()), false);
});

test('failures within the grace period stay warning; after it they are critical', async (t) => {
  let accepted = 0;
  const server = createTcpServer((s) => { accepted++; s.end(); });
  const port = await freePort();
  const cfg: MachineConfig = { image: 'x', checks: { alive: { type: 'tcp', port, interval: '20ms', grace_period: '400ms', timeout: '500ms' } } };
  const statuses: string[] = [];
  const runner = new MachineChecks(spec(cfg), () => statuses.push(runner.results()[0]!.status));
  t.after(() => runner.stop());
  await waitFor('a failure after the grace period', () => runner.results()[0]!.status === 'critical');
  assert.deepEqual(statuses, ['critical'], 'failures within the grace period changed nothing (still warning)');
  await new Promise<void>((r) => server.listen(port, '127.0.0.1', r));
  t.after(() => new Promise<void>((r) => server.close(() => r())));
  await waitFor('the check to pass once the port listens', () => runner.results()[0]!.status === 'passing');
  assert.ok(accepted > 0);
  assert.deepEqual(statuses, ['critical', 'passing']);
});
