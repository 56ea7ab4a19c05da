// Benchmark peer: Tarmac's proxy in its own process over a real SQLite catalog whose one app points at the backend.
// Usage: node --import tsx bench/proxy/tarmac-proxy.ts DATA_DIR BACKEND_PORT [WORKERS] [CERT_DIR]; prints {"port":N} when ready.
// WORKERS > 1 runs the proxy as a node:cluster of that many workers (startProxyCluster); WORKERS `haproxy` runs it with
// the HAProxy data plane in front (startHaproxyPlane, state in DATA_DIR/haproxy, one HAProxy thread per core). With CERT_DIR it also listens
// for HTTPS (self-signed certificates kept in CERT_DIR) and N is the HTTPS port. BENCH_WORKER_NODE_ARGS (space-separated
// node flags, e.g. `--cpu-prof --cpu-prof-dir=DIR`) adds to the workers' flags, which they do not inherit.
import { join } from 'node:path';
import { openSqliteCatalog } from '../../src/catalog/index.ts';
import { proxyWorkerHeapFlags, startHaproxyPlane, startProxy, startProxyCluster, trackProxyMetrics } from '../../src/proxy/index.ts';
import { silentLogger } from '../../src/shared/log.ts';

const [dataDir, backendPort, workers = '1', certDir] = process.argv.slice(2);
if (dataDir === undefined || backendPort === undefined) throw new Error('usage: tarmac-proxy.ts DATA_DIR BACKEND_PORT [WORKERS]');

const benchApp = 'bench';
const now = new Date().toISOString();
const id = '0000000000b0b0';
const catalog = openSqliteCatalog(join(dataDir, `catalog-${workers}${certDir === undefined ? '' : '-tls'}.sqlite`));
await catalog.putOrg({ slug: 'personal', name: 'Personal', network_id: 1, created_at: now });
await catalog.putHost({ id: 'h1', region: 'local', roles: ['worker'], host_number: 1, cpus: 2, memory_mb: 4096, address: '127.0.0.1', updated_at: now });
await catalog.createApp({ name: benchApp, org_slug: 'personal', network: 'default', created_at: now });
await catalog.createMachine({
  id, app: benchApp, name: 'bench-1', region: 'local', host_id: 'h1',
  // Limits above the benchmark's 64 connections: this measures the forwarding path, not the queue.
  config: { image: 'bench', services: [{ protocol: 'tcp', internal_port: Number(backendPort), ports: [{ port: 80, handlers: ['http'] }], concurrency: { type: 'requests', soft_limit: 1000, hard_limit: 1000 } }] },
  instance_id: `01INST${id}`, version: 1, desired: 'started', restart_generation: 0, cordoned: false,
  private_ip: '127.0.0.1', created_at: now, updated_at: now,
}, []);
await catalog.putMachineStatus({ id, app: benchApp, state: 'started', instance_id: `01INST${id}`, restarts: 0, restart_generation: 0, updated_at: now });

const opts = {
  catalog, http: { host: '127.0.0.1', port: 0 }, appsDomain: 'localhost', log: silentLogger(), region: 'bench',
  ...(certDir === undefined ? {} : { https: { host: '127.0.0.1', port: 0 }, certificatesDir: certDir }),
};
const extraWorkerArgs = (process.env.BENCH_WORKER_NODE_ARGS ?? '').split(' ').filter((a) => a !== '');
const proxy = workers === 'haproxy'
  ? await startHaproxyPlane({ ...opts, stateDir: join(dataDir, 'haproxy') })
  : Number(workers) > 1
  ? await startProxyCluster({
    ...opts, workers: Number(workers), logLevel: 'silent',
    ...(extraWorkerArgs.length > 0 ? { execArgv: [...proxyWorkerHeapFlags, ...extraWorkerArgs, '--import', 'tsx'] } : {}),
  })
  : await startProxy(opts);
// Metrics in the path, as the host has them (cluster workers track their own).
if (workers === 'haproxy' || Number(workers) <= 1) trackProxyMetrics(proxy);
process.stdout.write(`${JSON.stringify({ port: certDir === undefined ? proxy.address.port : proxy.httpsAddress!.port })}\n`);

process.once('SIGTERM', () => {
  void proxy.close().then(() => catalog.close()).then(() => process.exit(0));
});
