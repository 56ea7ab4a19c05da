// Prometheus metrics of the proxy (prom-client): request counts, latency and bytes per app from the request channel; load and table state read at scrape time.
import { subscribe } from 'node:diagnostics_channel';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { AggregatorRegistry, Counter, Gauge, Histogram, Registry, type PrometheusContentType } from 'prom-client';
import { proxyQueueChannel, proxyRequestChannel, type ProxyQueueEvent, type ProxyRequestEvent, type RunningProxy } from './proxy.ts';
import { proxyTlsChannel, type ProxyTlsEvent } from './tls.ts';
import { proxyConnectionChannel, type ProxyConnectionEvent } from './listeners.ts';

/** The proxy's registry; the host may merge it with its own (`Registry.merge`) or serve it with `metricsHandler`. */
export const proxyMetrics = new Registry();

/** Proxies whose table and backends the scrape-time gauges read. */
const tracked = new Set<RunningProxy>();
/** Requests waiting per app, from the queue channel. */
const queued = new Map<string, number>();

const statusClasses = ['none', '1xx', '2xx', '3xx', '4xx', '5xx'] as const;

/** Upper bounds of the request duration histogram, in seconds. */
const durationBounds = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30] as const;
/** The same in milliseconds (what the request events carry), so observing needs no division. */
const durationBoundsMs = durationBounds.map((b) => b * 1000);

/**
 * One app's request figures as plain numbers, bumped per request (no label objects, hashing or closures on the hot
 * path) and turned into Prometheus series only when scraped.
 */
class AppStats {
  /** Requests without a proxy error, by status class index (see statusClasses). */
  readonly ok = [0, 0, 0, 0, 0, 0];
  /** Requests with a proxy error: error code → counts by status class index. */
  readonly failed = new Map<string, number[]>();
  /** Duration histogram: counts per bucket (not cumulative; the last one is above every bound), sum in ms. */
  readonly buckets = new Array<number>(durationBounds.length + 1).fill(0);
  count = 0;
  sumMs = 0;
  bytes = 0;
}

const appStats = new Map<string, AppStats>();

type Series = { value: number; labels: Record<string, string | number>; metricName?: string };

/**
 * A metric family prom-client's registry serves (and a cluster's aggregator merges) whose series are computed at
 * scrape time from `appStats`: the registry only calls get() and reset().
 */
class ScrapedMetric {
  constructor(
    readonly name: string,
    readonly help: string,
    readonly type: 'counter' | 'histogram',
    readonly series: () => Series[],
  ) {}
  readonly aggregator = 'sum';
  get(): Promise<{ name: string; help: string; type: string; aggregator: string; values: Series[] }> {
    return Promise.resolve({ name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values: this.series() });
  }
  reset(): void {
    appStats.clear();
  }
}

function register(m: ScrapedMetric): void {
  // prom-client types its registry for its own metric classes; it reads only what ScrapedMetric has.
  proxyMetrics.registerMetric(m as unknown as Counter);
}

register(new ScrapedMetric(
  'tarmac_proxy_requests_total',
  'Requests answered by the proxy, by app, status class (1xx..5xx, or "none" when the client left first) and proxy error code.',
  'counter',
  () => {
    const out: Series[] = [];
    for (const [app, s] of appStats) {
      for (let c = 0; c < statusClasses.length; c++) {
        if (s.ok[c]! > 0) out.push({ value: s.ok[c]!, labels: { app, status_class: statusClasses[c]!, error: '' } });
      }
      for (const [error, counts] of s.failed) {
        for (let c = 0; c < statusClasses.length; c++) {
          if (counts[c]! > 0) out.push({ value: counts[c]!, labels: { app, status_class: statusClasses[c]!, error } });
        }
      }
    }
    return out;
  },
));

register(new ScrapedMetric(
  'tarmac_proxy_request_duration_seconds',
  'Time from the request head arriving to the response finishing (tunnels: to both sides closing), by app.',
  'histogram',
  () => {
    const out: Series[] = [];
    const bucket = 'tarmac_proxy_request_duration_seconds_bucket';
    for (const [app, s] of appStats) {
      if (s.count === 0) continue;
      let acc = 0;
      for (let i = 0; i < durationBounds.length; i++) {
        acc += s.buckets[i]!;
        out.push({ value: acc, labels: { le: durationBounds[i]!, app }, metricName: bucket });
      }
      out.push({ value: s.count, labels: { le: '+Inf', app }, metricName: bucket });
      out.push({ value: s.sumMs / 1000, labels: { app }, metricName: 'tarmac_proxy_request_duration_seconds_sum' });
      out.push({ value: s.count, labels: { app }, metricName: 'tarmac_proxy_request_duration_seconds_count' });
    }
    return out;
  },
));

register(new ScrapedMetric(
  'tarmac_proxy_response_bytes_total',
  'Response body bytes relayed from machines, by app.',
  'counter',
  () => {
    const out: Series[] = [];
    for (const [app, s] of appStats) if (s.bytes > 0) out.push({ value: s.bytes, labels: { app } });
    return out;
  },
));

new Gauge({
  name: 'tarmac_proxy_inflight',
  help: 'Requests, WebSocket tunnels, and connections and UDP flows on app addresses in flight per machine (what the concurrency limits count).',
  labelNames: ['app', 'machine'] as const,
  registers: [proxyMetrics],
  collect() {
    this.reset();
    for (const p of tracked) {
      for (const route of p.routes.apps.values()) {
        for (const b of route.backends) this.inc({ app: b.app, machine: b.machineId }, b.inflight);
      }
      for (const entry of p.routes.ports.values()) {
        for (const b of entry.backends) this.inc({ app: b.app, machine: b.machineId }, b.inflight);
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
  aggregator: 'max',
  collect() {
    for (const p of tracked) this.set(p.routes.version);
  },
});

new Gauge({
  name: 'tarmac_proxy_routing_table_updated_seconds',
  help: 'Unix time when the routing table in use was built (in a cluster: the oldest of its workers\'.',
  registers: [proxyMetrics],
  aggregator: 'min',
  collect() {
    for (const p of tracked) this.set(p.routes.builtAt / 1000);
  },
});

new Gauge({
  name: 'tarmac_proxy_routing_table_revision',
  help: 'Catalog revision the routing table in use reflects (in a cluster: the furthest behind of its workers\').',
  registers: [proxyMetrics],
  aggregator: 'min',
  collect() {
    for (const p of tracked) this.set(p.routes.revision);
  },
});

function onRequest(m: unknown): void {
  const e = m as ProxyRequestEvent;
  const app = e.app ?? '';
  let s = appStats.get(app);
  if (s === undefined) appStats.set(app, (s = new AppStats()));
  const c = e.status >= 100 && e.status < 600 ? (e.status / 100) | 0 : 0;
  if (e.error === undefined) s.ok[c]!++;
  else {
    let counts = s.failed.get(e.error);
    if (counts === undefined) s.failed.set(e.error, (counts = [0, 0, 0, 0, 0, 0]));
    counts[c]!++;
  }
  const ms = e.durationMs;
  let b = 0;
  while (b < durationBoundsMs.length && ms > durationBoundsMs[b]!) b++;
  s.buckets[b]!++;
  s.count++;
  s.sumMs += ms;
  s.bytes += e.responseBytes;
}

function onQueue(m: unknown): void {
  const e = m as ProxyQueueEvent;
  if (e.queued === 0) queued.delete(e.app);
  else queued.set(e.app, e.queued);
}

const handshakeTime = new Histogram({
  name: 'tarmac_proxy_tls_handshake_seconds',
  help: 'Time from accepting a TLS connection to its handshake completing, by protocol version.',
  labelNames: ['version'] as const,
  buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1],
  registers: [proxyMetrics],
});

const handshakeFailures = new Counter({
  name: 'tarmac_proxy_tls_handshake_failures_total',
  help: 'TLS handshakes that failed, by reason (protocol_version, not_tls, timeout, reset, no_shared_cipher, other).',
  labelNames: ['reason'] as const,
  registers: [proxyMetrics],
});

function onTls(m: unknown): void {
  const e = m as ProxyTlsEvent;
  if (e.failure !== undefined) handshakeFailures.inc({ reason: e.failure });
  else if (e.durationMs !== undefined) handshakeTime.observe({ version: e.version ?? '' }, e.durationMs / 1000);
}

const connections = new Counter({
  name: 'tarmac_proxy_connections_total',
  help: 'TCP connections and UDP flows on apps\' own addresses, by app, protocol and proxy error (no_machine, over_capacity, backend_unreachable; empty when relayed).',
  labelNames: ['app', 'protocol', 'error'] as const,
  registers: [proxyMetrics],
});

const connectionBytes = new Counter({
  name: 'tarmac_proxy_connection_bytes_total',
  help: 'Bytes relayed on apps\' own addresses, by app, protocol and direction (in: client to machine, out: machine to client).',
  labelNames: ['app', 'protocol', 'direction'] as const,
  registers: [proxyMetrics],
});

function onConnection(m: unknown): void {
  const e = m as ProxyConnectionEvent;
  connections.inc({ app: e.app, protocol: e.protocol, error: e.error ?? '' });
  if (e.bytesIn > 0) connectionBytes.inc({ app: e.app, protocol: e.protocol, direction: 'in' }, e.bytesIn);
  if (e.bytesOut > 0) connectionBytes.inc({ app: e.app, protocol: e.protocol, direction: 'out' }, e.bytesOut);
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
    subscribe(proxyTlsChannel, onTls);
    subscribe(proxyConnectionChannel, onConnection);
  }
  tracked.add(proxy);
  return () => tracked.delete(proxy);
}

/**
 * In a proxy cluster worker: answers the primary's scrapes with this process's proxy metrics (see
 * `metricsHandler`'s `cluster`).
 */
export function shareProxyMetricsWithPrimary(): void {
  new AggregatorRegistry(); // installs the worker's answer to the primary's requests
  AggregatorRegistry.setRegistries([proxyMetrics]);
}

let aggregator: AggregatorRegistry<PrometheusContentType> | undefined;

/**
 * Serves the proxy metrics in the Prometheus text format; mount it at GET /metrics. With `cluster`, in the primary
 * of a proxy cluster: every worker's, merged (counters and histograms summed, in-flight and queue gauges summed,
 * routing table version the newest, revision and build time the furthest behind).
 */
export function metricsHandler(_req: IncomingMessage, res: ServerResponse, cluster = false): void {
  const body = cluster ? (aggregator ??= new AggregatorRegistry()).clusterMetrics() : proxyMetrics.metrics();
  body.then((body) => {
    res.writeHead(200, { 'content-type': proxyMetrics.contentType, 'cache-control': 'no-store' });
    res.end(body);
  }, (err: unknown) => {
    res.writeHead(500, { 'content-type': 'text/plain; charset=utf-8' });
    res.end(`metrics failed: ${err instanceof Error ? err.message : String(err)}\n`);
  });
}
