// Benchmark of fleet propagation: a catalog write on one host until the proxies of all three hosts route by it.
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startEtcdCluster } from '../../test/helpers/etcd.ts';
import { etcdCommitChannel, openEtcdCatalog, type EtcdCatalog, type EtcdCommitEvent } from '../../src/catalog/etcd.ts';
import { mirrorApplyChannel, type MirrorApplyEvent } from '../../src/catalog/mirror.ts';
import type { MachineSpec } from '../../src/catalog/index.ts';
import { startProxy, type RunningProxy } from '../../src/proxy/index.ts';
import { silentLogger } from '../../src/shared/log.ts';
import { machineDescription, percentile } from '../machine-start.ts';
import { openLoop } from '../open-loop.ts';

const now = () => new Date().toISOString();
const loadAverage = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');

interface Host { name: string; path: string; catalog: EtcdCatalog; proxy: RunningProxy }

/** One write's timeline, ms after the write call: etcd's answer, and per host the watch response, its commit, the swap. */
interface Timeline { at: number; app: string; committed?: number; received: Map<string, number>; applied: Map<string, number>; routed: Map<string, number> }

/** Per stage, the time until the last of the three hosts got there (ms after the write call), for the samples that finished. */
type Stages = Record<'committed' | 'received' | 'applied' | 'routed', number[]>;

function spec(i: number): MachineSpec {
  return {
    id: `r${i}`, app: `bench${i % 10}`, name: `m${i}`, region: 'local', host_id: 'h1',
    config: { image: 'registry.example/app:latest', services: [{ protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }] }] },
    instance_id: `01J${String(i).padStart(23, '0')}`, version: 1, desired: 'started', restart_generation: 0, cordoned: false,
    private_ip: `fdaa:0:1:0:1:0:${i.toString(16)}:2`, created_at: now(), updated_at: now(),
  };
}

/** True when `proxy`'s routing table has machine `id` as a backend of its app. */
function routes(proxy: RunningProxy, app: string, id: string): boolean {
  return proxy.routes.apps.get(app)?.backends.some((b) => b.machineId === id) === true;
}

/**
 * Open-loop writes at `rate`/s on the first host's catalog, each starting a machine (its worker's status write);
 * per write, the time until every host's proxy has swapped in a routing table with that machine, and on the way
 * (from the catalog's diagnostics channels) when etcd answered and when each host's mirror received and applied it.
 */
async function propagation(hosts: Host[], rate: number, first: number, count: number): Promise<Stages> {
  const writes = new Map<string, Timeline>();
  const idOf = (key: string) => /\/machines\/([^/]+)\/status$/.exec(key)?.[1];
  const onCommit = (m: unknown) => {
    const e = m as EtcdCommitEvent;
    const w = writes.get(idOf(e.ops[0]?.request_put?.key?.toString() ?? '') ?? '');
    if (w) w.committed = e.at;
  };
  const onApply = (m: unknown) => {
    const e = m as MirrorApplyEvent;
    const host = hosts.find((h) => h.path === e.path)?.name;
    if (host === undefined) return;
    for (const ev of e.events) {
      const w = writes.get(idOf(ev.kv.key.toString()) ?? '');
      if (!w || w.received.has(host)) continue;
      w.received.set(host, e.receivedAt);
      w.applied.set(host, e.appliedAt);
    }
  };
  subscribe(etcdCommitChannel, onCommit);
  subscribe(mirrorApplyChannel, onApply);
  let pending = 0;
  const offs = hosts.map((h) => h.catalog.subscribe(() => {
    // The proxy subscribed first and swaps in a microtask it queued before this one; look right after it.
    queueMicrotask(() => {
      const t = performance.now();
      for (const [id, w] of writes) {
        if (w.routed.has(h.name) || !routes(h.proxy, w.app, id)) continue;
        w.routed.set(h.name, t);
        if (w.routed.size === hosts.length) pending--;
      }
    });
  }));
  const writer = hosts[0]!.catalog;
  await openLoop(rate, count, (k) => {
    const s = spec(first + k);
    writes.set(s.id, { at: performance.now(), app: s.app, received: new Map(), applied: new Map(), routed: new Map() });
    pending++;
    return writer.putMachineStatus({ id: s.id, app: s.app, state: 'started', instance_id: s.instance_id, restarts: 0, restart_generation: 0, updated_at: now() });
  }, () => pending);
  for (const off of offs) off();
  unsubscribe(etcdCommitChannel, onCommit);
  unsubscribe(mirrorApplyChannel, onApply);
  const stages: Stages = { committed: [], received: [], applied: [], routed: [] };
  const last = (m: Map<string, number>) => Math.max(...m.values());
  for (const w of writes.values()) {
    if (w.routed.size < hosts.length || w.committed === undefined || w.applied.size < hosts.length) continue;
    stages.committed.push(w.committed - w.at);
    stages.received.push(last(w.received) - w.at);
    stages.applied.push(last(w.applied) - w.at);
    stages.routed.push(last(w.routed) - w.at);
  }
  return stages;
}

export async function benchFleet(): Promise<string> {
  const when = new Date().toISOString();
  const cluster = await startEtcdCluster(3);
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-bench-fleet-'));
  const hosts: Host[] = [];
  const rows: string[] = [];
  const stageRows: string[] = [];
  try {
    const plan = [[10, 100], [100, 1000]] as const;
    const total = plan.reduce((n, [, count]) => n + count, 0);
    for (const name of ['h1', 'h2', 'h3']) {
      // Each host's catalog client spread over the three members, its own mirror, its own proxy.
      const catalog = await openEtcdCatalog({ endpoints: cluster.endpoints, prefix: '/tarmac/', mirrorPath: join(dir, `${name}.sqlite`), log: silentLogger() });
      if (hosts.length === 0) {
        await catalog.putOrg({ slug: 'personal', name: 'P', network_id: 1, created_at: now() });
        for (let a = 0; a < 10; a++) await catalog.createApp({ name: `bench${a}`, org_slug: 'personal', network: 'default', created_at: now() });
        await catalog.putHost({ id: 'h1', region: 'local', roles: ['worker'], host_number: 1, cpus: 2, memory_mb: 4096, address: '127.0.0.1', updated_at: now() });
        // The machines exist (placed, not yet started) before the run: each write is the worker reporting one started.
        for (let i = 0; i < total; i++) await catalog.createMachine(spec(i), []);
      }
      await catalog.waitForRevision(hosts[0]?.catalog.revision() ?? catalog.revision());
      const proxy = await startProxy({ catalog, http: { host: '127.0.0.1', port: 0 }, log: silentLogger(), hostId: name });
      hosts.push({ name, path: join(dir, `${name}.sqlite`), catalog, proxy });
    }
    let first = 0;
    for (const [rate, count] of plan) {
      const load = loadAverage();
      const st = await propagation(hosts, rate, first, count);
      first += count;
      const ms = st.routed;
      const p = (xs: number[]) => `${percentile(xs, 50).toFixed(1)} / ${percentile(xs, 99).toFixed(1)}`;
      rows.push(`| ${rate} writes/s | ${ms.length} of ${count} | ${percentile(ms, 50).toFixed(1)} | ${percentile(ms, 99).toFixed(1)} | ${Math.max(...ms).toFixed(1)} | ${load} |`);
      stageRows.push(`| ${rate} writes/s | ${p(st.committed)} | ${p(st.received)} | ${p(st.applied)} | ${p(st.routed)} |`);
    }
  } finally {
    for (const h of hosts) {
      await h.proxy.close();
      await h.catalog.close();
    }
    await cluster.stop();
    await rm(dir, { recursive: true, force: true });
  }
  return `# Fleet propagation: a write until every host's proxy routes by it (issue 4)

Run ${when} on: ${machineDescription()}.
A real 3-member etcd cluster on loopback and three hosts in one process, each with its own etcd client (spread
over the members), its own SQLite mirror and its own Tarmac proxy. One host writes open-loop machine status
changes (a machine reported started); each sample is the time from the write call until the routing tables of
all three proxies have that machine as a backend (the write's whole path: etcd commit, three watches, three
mirror transactions, three routing swaps). Everything shares the machine's two cores. Target: p50 < 10 ms,
p99 < 100 ms (Fly reports about a second for Corrosion fleet-wide).

| rate | samples | p50 ms | p99 ms | max ms | load (1, 5, 15 min) |
|---|---|---|---|---|---|
${rows.join('\n')}

Where the time goes: the same samples, each stage as the time from the write call until the last of the three hosts
got there (p50 / p99 ms), from the catalog's diagnostics channels (\`tarmac:catalog:etcd:commit\` when etcd
answered the writer, \`tarmac:catalog:mirror:apply\` when a host's watch response arrived and when its SQLite
transaction committed) and the routing table check above.

| rate | etcd answered the writer | watch response at the last host | applied by the last mirror | routed by the last proxy |
|---|---|---|---|---|
${stageRows.join('\n')}

Reading it: the columns are cumulative, so each difference is one stage. What Tarmac does after the watch response
arrives (the mirror's SQLite transaction, then the proxy's rebuild on the next turn of the event loop) is the
difference between the second and the last column; the rest is etcd committing on three members that share one disk
and two cores, and delivering the watch.
`;
}
