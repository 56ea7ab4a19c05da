// End to end on one host: an app address allocated through the API, a registry image's port relayed as raw TCP by the proxy.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { startRegistry } from './helpers/registry.ts';
import { httpImage } from './helpers/images.ts';
import { startTestHost } from './helpers/host.ts';
import { freePort } from './helpers/registry.ts';
import { waitFor } from './helpers/wait.ts';

/** Sends a raw HTTP/1.0 request over a plain TCP connection and returns everything the other end sent back. */
function rawGet(ip: string, port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: ip, port });
    let got = '';
    s.on('data', (d: Buffer) => { got += d.toString(); });
    s.once('error', reject);
    s.once('connect', () => s.write('GET / HTTP/1.0\r\n\r\n'));
    s.once('close', () => resolve(got));
  });
}

test('a machine\'s tcp port is reached raw on the app\'s own address, which opens on allocate and closes on release', async (t) => {
  const registry = await startRegistry();
  t.after(() => registry.stop());
  const image = await httpImage(registry.host);
  const h = await startTestHost();
  t.after(() => h.close());
  const port = await freePort();
  await h.client.createApp({ app_name: 'raw', org_slug: 'personal' });
  const m = await h.client.createMachine('raw', {
    config: { image, services: [{ protocol: 'tcp', internal_port: 8080, ports: [{ port }] }] },
  });
  await h.client.waitMachine('raw', m.id, { state: 'started', timeout: 60 });
  const ip = (await h.client.allocateIp('raw', { type: 'v4' })).ip;
  assert.match(ip, /^127\.0\.\d+\.\d+$/, 'from the default loopback pool');

  // No http handler: the proxy adds nothing, the machine's own HTTP answer comes back byte for byte.
  const answer = await waitFor('the machine to answer on the app address', async () => {
    const got = await rawGet(ip, port).catch(() => '');
    return got.includes('200 OK') ? got : undefined;
  }, 30_000);
  assert.match(answer, new RegExp(`\\r\\n\\r\\n${m.id}\\n?$`), 'the body is the machine\'s hostname (its id)');
  assert.doesNotMatch(answer, /fly-request-id|via: 1\.1 tarmac/i, 'raw passthrough: no proxy headers');
  const metrics = await (await fetch(h.host.metricsUrl)).text();
  assert.match(metrics, /tarmac_proxy_connections_total\{app="raw",protocol="tcp",error=""\} [1-9]/);

  await h.client.releaseIp('raw', ip);
  await waitFor('the app address to stop listening', async () => (await rawGet(ip, port).catch(() => 'refused')) === 'refused');
});
