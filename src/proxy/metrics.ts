// Prometheus metrics of the proxy (prom-client): request counts, latency and bytes per app from the request channel; load and table state read at scrape time.
import { subscribe } from 'node:diagnostics_channel';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import { proxyQueueChannel, proxyRequestChannel, type ProxyQueueEvent, type ProxyRequestEvent, type RunningProxy } from './proxy.ts';

/** The proxy's registry; the host may merge it with its own (`Registry.merge`) or serve it with `metricsHandler`. */
export const proxyMetrics = new Registry();

/** Proxies whose table and backends the scrape-time gauges read. */
const tracked = new Set<RunningProxy>();
/** Requests waiting per app, from the queue channel. */
const queued = new Map<string, number>();

const requests = new Counter({
  name: 'tarmac_proxy_requests_total',
  help: 'Requests answered by the proxy, by app, status class (1xx..5xx, or "none" when the client left first) and proxy error code.',
  labelNames: ['app', 'status_class', 'error'] as const,
  registers: [proxyMetrics],
});

const duration = new Histogram({
  name: 'tarmac_proxy_request_duration_seconds',
  help: 'Time from the request head arriving to the response finishing (tunnels: to both sides closing), by app.',
  labelNames: ['app'] as const,
  buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
  registers: [proxyMetrics],
});

const responseBytes = new Counter({
  name: 'tarmac_proxy_response_bytes_total',
  help: 'Response body bytes relayed from machines, by app.',
  labelNames: ['app'] as const,
  registers: [proxyMetrics],
});

new Gauge({
  name: 'tarmac_proxy_inflight',
  help: 'Requests and WebSocket tunnels in flight per machine (what the concurrency limits count).',
  labelNames: ['app', 'machine'] as const,
  registers: [proxyMetrics],
  collect() {
    this.reset();
    for (const p of tracked) {
      for (const route of p.routes.apps.values()) {
        for (const b of route.backends) this.inc({ app: b.app, machine: b.machineId }, b.inflight);
      }
    }
  },
});

new Gauge({
  name: 'tarmac_proxy_queued',
  help: 'Requests waiting because every machine of the app is at its hard concurrency limit, per app.',
  labelNames: ['app'] as const,
  registers: [proxyMetrics],
  collect() {
    this.reset();
    for (const [app, n] of queued) this.set({ app }, n);
  },
});

new Gauge({
  name: 'tarmac_proxy_routing_table_version',
  help: 'Version of the routing table in use (increments on every swap).',
  registers: [proxyMetrics],
  collect() {
    for (const p of tracked) this.set(p.routes.version);
  },
});

new Gauge({
  name: 'tarmac_proxy_routing_table_updated_seconds',
  help: 'Unix time when the routing table in use was built.',
  registers: [proxyMetrics],
  collect() {
    for (const p of tracked) this.set(p.routes.builtAt / 1000);
  },
});

new Gauge({
  name: 'tarmac_proxy_routing_table_revision',
  help: 'Catalog revision the routing table in use reflects.',
  registers: [proxyMetrics],
  collect() {
    for (const p of tracked) this.set(p.routes.revision);
  },
});

const statusClasses = ['none', '1xx', '2xx', '3xx', '4xx', '5xx'] as const;

function onRequest(m: unknown): void {
  const e = m as ProxyRequestEvent;
  const app = e.app ?? '';
  requests.inc({ app, status_class: statusClasses[Math.floor(e.status / 100)] ?? 'none', error: e.error ?? '' });
  duration.observe({ app }, e.durationMs / 1000);
  if (e.responseBytes > 0) responseBytes.inc({ app }, e.responseBytes);
}

function onQueue(m: unknown): void {
  const e = m as ProxyQueueEvent;
  if (e.queued === 0) queued.delete(e.app);
  else queued.set(e.app, e.queued);
}

let subscribed = false;

/**
 * Counts a running proxy in the metrics: its table and backend loads are read at each scrape, and the first call
 * subscribes to the request and queue channels (so a process that never calls it pays nothing per request).
 * Returns a function that stops reading that proxy.
 */
export function trackProxyMetrics(proxy: RunningProxy): () => void {
  if (!subscribed) {
    subscribed = true;
    subscribe(proxyRequestChannel, onRequest);
    subscribe(proxyQueueChannel, onQueue);
  }
  tracked.add(proxy);
  return () => tracked.delete(proxy);
}

/** Serves `proxyMetrics` in the Prometheus text format; mount it at GET /metrics. */
export function metricsHandler(_req: IncomingMessage, res: ServerResponse): void {
  proxyMetrics.metrics().then((body) => {
    res.writeHead(200, { 'content-type': proxyMetrics.contentType, 'cache-control': 'no-store' });
    res.end(body);
  }, (err: unknown) => {
    res.writeHead(500, { 'content-type': 'text/plain; charset=utf-8' });
    res.end(`metrics failed: ${err instanceof Error ? err.message : String(err)}\n`);
  });
}
