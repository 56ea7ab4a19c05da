// The proxy's Prometheus metrics scraped over HTTP from metricsHandler after real traffic through a real proxy.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { request } from 'undici';
import { waitFor } from '../../test/helpers/wait.ts';
import { metricsHandler, trackProxyMetrics } from './metrics.ts';
import { createApp, httpService, proxyFor, startedMachine, tempCatalog } from './testing.ts';

test('requests by app and status class, latency, bytes, in-flight per machine and the table version are exported', async (t) => {
  const c = await tempCatalog(t);
  await createApp(c, 'web');
  let hold: (() => void) | undefined;
  const machine = createServer((req, res) => {
    if (req.url === '/hold') hold = () => res.end('held');
    else res.end('0123456789');
  });
  await new Promise<void>((resolve) => machine.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => { machine.closeAllConnections(); machine.close(() => resolve()); }));
  const id = await startedMachine(c, 'web', httpService((machine.address() as AddressInfo).port));
  const proxy = await proxyFor(t, c);
  t.after(trackProxyMetrics(proxy));
  const scrapeServer = createServer(metricsHandler);
  await new Promise<void>((resolve) => scrapeServer.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => scrapeServer.close(() => resolve())));
  const scrape = async () => (await (await fetch(`http://127.0.0.1:${(scrapeServer.address() as AddressInfo).port}/metrics`)).text());

  const get = async (host: string, path = '/') => {
    const res = await request(`http://127.0.0.1:${proxy.address.port}${path}`, { headers: { host } });
    await res.body.text();
    return res.statusCode;
  };
  for (let i = 0; i < 3; i++) assert.equal(await get('web.localhost'), 200);
  assert.equal(await get('nobody.localhost'), 404);
  const held = get('web.localhost', '/hold');
  await waitFor('the held request to reach the machine', () => hold !== undefined);

  const text = await scrape();
  assert.match(text, /^tarmac_proxy_requests_total\{app="web",status_class="2xx",error=""\} 3$/m);
  assert.match(text, /^tarmac_proxy_requests_total\{app="",status_class="4xx",error="app_not_found"\} 1$/m);
  assert.match(text, /^tarmac_proxy_request_duration_seconds_count\{app="web"\} 3$/m);
  assert.match(text, /^tarmac_proxy_response_bytes_total\{app="web"\} 30$/m);
  assert.match(text, new RegExp(`^tarmac_proxy_inflight\\{app="web",machine="${id}"\\} 1$`, 'm'));
  assert.match(text, new RegExp(`^tarmac_proxy_routing_table_version ${proxy.routes.version}$`, 'm'));
  assert.match(text, /^tarmac_proxy_routing_table_updated_seconds \d+(\.\d+)?$/m);

  hold!();
  assert.equal(await held, 200);
  await waitFor('the slot to be given back in the metrics', async () => new RegExp(`^tarmac_proxy_inflight\\{app="web",machine="${id}"\\} 0$`, 'm').test(await scrape()));
});
