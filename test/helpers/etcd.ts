// Starts a real etcd cluster (Debian's etcd-server) on free loopback ports with data in temp dirs, for tests.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { Etcd3 } from 'etcd3';
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
  /** The member that is the raft leader now (as the running members report it). */
  leader(): Promise<EtcdMember>;
  stop(): Promise<void>;
}

/** Where members run, when not all on loopback in this network namespace. */
export interface EtcdPlacement {
  /** Member i listens on addresses[i] (ports 2379 and 2380), e.g. each in its own network namespace. */
  addresses: string[];
  /** Command prefix that runs member i where its address lives (e.g. `nsenter --net=…`). */
  wrap(i: number): string[];
}

/**
 * A free loopback port below Linux's ephemeral range (32768 and up): a member stopped and started again must find its
 * ports free, and while it is down any connection's source port (the host's etcd client reconnecting, say) could take
 * one from the ephemeral range.
 */
async function stablePort(): Promise<number> {
  for (;;) {
    const port = 20_000 + Math.floor(Math.random() * 12_000);
    const free = await new Promise<boolean>((resolve) => {
      const s = createServer();
      s.once('error', () => resolve(false));
      s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
    });
    if (free) return port;
  }
}

/** Starts `n` members that form one cluster; resolves once every member reports healthy. */
export async function startEtcdCluster(n = 3, placement?: EtcdPlacement): Promise<EtcdCluster> {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-etcd-'));
  const ports: Array<{ client: number; peer: number; host: string }> = [];
  for (let i = 0; i < n; i++) {
    const host = placement?.addresses[i];
    ports.push(host === undefined ? { client: await stablePort(), peer: await stablePort(), host: '127.0.0.1' } : { client: 2379, peer: 2380, host });
  }
  const names = ports.map((_, i) => `m${i}`);
  const initialCluster = ports.map((p, i) => `${names[i]}=http://${p.host}:${p.peer}`).join(',');
  const token = `tarmac-test-${process.pid}-${Date.now()}`;
  const procs: Array<ChildProcess | undefined> = new Array(n).fill(undefined);
  const logs: string[][] = ports.map(() => []);

  const launch = (i: number) => {
    const p = ports[i]!;
    const [cmd, ...prefix] = [...(placement?.wrap(i) ?? []), etcdBin];
    const child = spawn(cmd!, [...prefix,
      '--name', names[i]!,
      '--data-dir', join(dir, names[i]!),
      '--listen-client-urls', `http://${p.host}:${p.client}`,
      '--advertise-client-urls', `http://${p.host}:${p.client}`,
      '--listen-peer-urls', `http://${p.host}:${p.peer}`,
      '--initial-advertise-peer-urls', `http://${p.host}:${p.peer}`,
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
    const res = await fetch(`http://${ports[i]!.host}:${ports[i]!.client}/health`, { signal: AbortSignal.timeout(2_000) });
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

  const endpoints = ports.map((p) => `${p.host}:${p.client}`);
  const members: EtcdMember[] = ports.map((p, i) => ({
    name: names[i]!,
    clientUrl: `http://${p.host}:${p.client}`,
    get running() { return procs[i] !== undefined; },
    stop: () => kill(i),
    async start() {
      if (procs[i]) return;
      launch(i);
      // A lone member of a cluster without quorum never reports healthy: wait for its port to answer instead.
      await waitFor(`etcd member ${names[i]} listening`, async () => {
        const c = procs[i];
        if (c && c.exitCode !== null) throw new Error(`etcd ${names[i]} exited: ${logs[i]!.join('').slice(-2000)}`);
        const res = await fetch(`http://${p.host}:${p.client}/version`, { signal: AbortSignal.timeout(2_000) });
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
    async leader() {
      const statuses = await Promise.all(members.filter((m) => m.running).map(async (m) => {
        const client = new Etcd3({ hosts: m.clientUrl });
        try {
          const s = await client.maintenance.status();
          return { member: m, id: s.header.member_id, leader: s.leader };
        } finally {
          client.close();
        }
      }));
      const leader = statuses.find((s) => s.id === s.leader && statuses.every((o) => o.leader === s.leader));
      if (!leader) throw new Error(`no agreed etcd leader: ${JSON.stringify(statuses.map((s) => [s.member.name, s.id, s.leader]))}`);
      return leader.member;
    },
    async stop() {
      await stopAll();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
