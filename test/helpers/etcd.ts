// Starts a real etcd cluster (Debian's etcd-server) on free loopback ports with data in temp dirs, for tests.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Etcd3 } from 'etcd3';
import { freePort } from './registry.ts';
import { waitFor } from './wait.ts';

const etcdBin = '/usr/bin/etcd';

export interface EtcdMember {
  name: string;
  clientUrl: string;
  /** Kills the member (SIGKILL, like a crash); its data dir stays for `start()`. */
  stop(): Promise<void>;
  /** Starts a stopped member again on the same ports and data; resolves once it is healthy. */
  start(): Promise<void>;
  readonly running: boolean;
}

export interface EtcdCluster {
  endpoints: string[];
  members: EtcdMember[];
  /** Compacts the whole keyspace up to the current revision (physically), returning that revision. */
  compact(): Promise<number>;
  stop(): Promise<void>;
}

/** Starts `n` members that form one cluster; resolves once every member reports healthy. */
export async function startEtcdCluster(n = 3): Promise<EtcdCluster> {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-etcd-'));
  const ports: Array<{ client: number; peer: number }> = [];
  for (let i = 0; i < n; i++) ports.push({ client: await freePort(), peer: await freePort() });
  const names = ports.map((_, i) => `m${i}`);
  const initialCluster = ports.map((p, i) => `${names[i]}=http://127.0.0.1:${p.peer}`).join(',');
  const token = `tarmac-test-${process.pid}-${Date.now()}`;
  const procs: Array<ChildProcess | undefined> = new Array(n).fill(undefined);
  const logs: string[][] = ports.map(() => []);

  const launch = (i: number) => {
    const p = ports[i]!;
    const child = spawn(etcdBin, [
      '--name', names[i]!,
      '--data-dir', join(dir, names[i]!),
      '--listen-client-urls', `http://127.0.0.1:${p.client}`,
      '--advertise-client-urls', `http://127.0.0.1:${p.client}`,
      '--listen-peer-urls', `http://127.0.0.1:${p.peer}`,
      '--initial-advertise-peer-urls', `http://127.0.0.1:${p.peer}`,
      '--initial-cluster', initialCluster,
      '--initial-cluster-state', 'new',
      '--initial-cluster-token', token,
      '--logger', 'zap', '--log-level', 'error',
      '--snapshot-count', '100000',
    ], { stdio: ['ignore', 'ignore', 'pipe'] });
    child.stderr!.setEncoding('utf8').on('data', (d: string) => {
      const l = logs[i]!;
      l.push(d);
      if (l.length > 50) l.shift();
    });
    procs[i] = child;
  };
  const healthy = async (i: number) => {
    const res = await fetch(`http://127.0.0.1:${ports[i]!.client}/health`, { signal: AbortSignal.timeout(2_000) });
    const body = (await res.json()) as { health?: string };
    return body.health === 'true';
  };
  const kill = async (i: number) => {
    const child = procs[i];
    procs[i] = undefined;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await exited;
  };
  const stopAll = async () => {
    await Promise.all(procs.map((_, i) => kill(i)));
  };

  try {
    for (let i = 0; i < n; i++) launch(i);
    for (let i = 0; i < n; i++) {
      await waitFor(`etcd member ${names[i]} healthy`, () => {
        const c = procs[i];
        if (c && c.exitCode !== null) throw new Error(`etcd ${names[i]} exited: ${logs[i]!.join('').slice(-2000)}`);
        return healthy(i);
      }, 30_000);
    }
  } catch (e) {
    await stopAll();
    await rm(dir, { recursive: true, force: true });
    throw e;
  }

  const endpoints = ports.map((p) => `127.0.0.1:${p.client}`);
  const members: EtcdMember[] = ports.map((p, i) => ({
    name: names[i]!,
    clientUrl: `http://127.0.0.1:${p.client}`,
    get running() { return procs[i] !== undefined; },
    stop: () => kill(i),
    async start() {
      if (procs[i]) return;
      launch(i);
      // A lone member of a cluster without quorum never reports healthy: wait for its port to answer instead.
      await waitFor(`etcd member ${names[i]} listening`, async () => {
        const c = procs[i];
        if (c && c.exitCode !== null) throw new Error(`etcd ${names[i]} exited: ${logs[i]!.join('').slice(-2000)}`);
        const res = await fetch(`http://127.0.0.1:${p.client}/version`, { signal: AbortSignal.timeout(2_000) });
        return res.ok;
      }, 30_000);
    },
  }));

  return {
    endpoints,
    members,
    async compact() {
      const client = new Etcd3({ hosts: members.filter((m) => m.running).map((m) => m.clientUrl) });
      try {
        const res = await client.kv.range({ key: Buffer.from('\0'), limit: '1' });
        const revision = res.header.revision;
        await client.kv.compact({ revision, physical: true });
        return Number(revision);
      } finally {
        client.close();
      }
    },
    async stop() {
      await stopAll();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
