// Helpers for the DNS server's tests and benchmark: a fleet in a real SQLite catalog, `dig` with its output parsed, a tiny upstream.
import { execFile } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { createServer } from 'node:net';
import { promisify } from 'node:util';
import packet from 'dns-packet';
import { machineAddress, type Catalog, type MachineSpec } from '../catalog/index.ts';

const run = promisify(execFile);
const now = () => new Date().toISOString();

/** A machine to write into the catalog. */
export interface FixtureMachine {
  id: string;
  app: string;
  host: string;
  region: string;
  /** Host number and machine number of its private address (org network from the app's org). */
  hostNumber: number;
  number: number;
  state: 'started' | 'stopped';
  group?: string;
}

/** Writes orgs, registered hosts, apps and machines (spec then status, as the API and the worker do). */
export async function writeFleet(c: Catalog, fleet: {
  orgs: Array<{ slug: string; network: number }>;
  hosts: Array<{ id: string; region: string; number: number }>;
  apps: Array<{ name: string; org: string }>;
  machines: FixtureMachine[];
}): Promise<Map<string, string>> {
  for (const o of fleet.orgs) await c.putOrg({ slug: o.slug, name: o.slug, network_id: o.network, created_at: now() });
  for (const h of fleet.hosts) {
    await c.putHost({ id: h.id, region: h.region, roles: ['worker'], host_number: h.number, cpus: 2, memory_mb: 4096, address: '127.0.0.1', updated_at: now() });
  }
  for (const a of fleet.apps) await c.createApp({ name: a.name, org_slug: a.org, network: 'default', created_at: now() });
  const ips = new Map<string, string>();
  for (const m of fleet.machines) {
    const org = fleet.apps.find((a) => a.name === m.app)!.org;
    const network = fleet.orgs.find((o) => o.slug === org)!.network;
    const ip = machineAddress(network, m.hostNumber, m.number);
    ips.set(m.id, ip);
    await c.createMachine(machineSpec(m, ip), []);
    await c.putMachineStatus({ id: m.id, app: m.app, state: m.state, instance_id: `inst-${m.id}`, restarts: 0, restart_generation: 0, updated_at: now() });
  }
  return ips;
}

function machineSpec(m: FixtureMachine, ip: string): MachineSpec {
  return {
    id: m.id, app: m.app, name: m.id, region: m.region, host_id: m.host,
    config: { image: 'busybox', ...(m.group ? { metadata: { fly_process_group: m.group } } : {}) },
    instance_id: `inst-${m.id}`, version: 1, desired: m.state, restart_generation: 0, cordoned: false,
    private_ip: ip, created_at: now(), updated_at: now(),
  };
}

/** One resource record as dig prints it. */
export interface DigRecord {
  name: string;
  ttl: number;
  type: string;
  data: string;
}

/** What dig saw: status, header flags, sections, the EDNS pseudo-section line. */
export interface DigResult {
  status: string;
  flags: string[];
  answers: DigRecord[];
  authority: DigRecord[];
  /** e.g. "; EDNS: version: 0, flags: do; udp: 1232", undefined without OPT. */
  edns: string | undefined;
  raw: string;
}

/** Runs dig against `server` (`@addr -p port`), one try, no retry over TCP unless dig decides to. */
export async function dig(server: { host: string; port: number }, name: string, type: string, extra: string[] = []): Promise<DigResult> {
  const { stdout } = await run('dig', [`@${server.host}`, '-p', String(server.port), '+tries=1', '+time=3', ...extra, name, type], { timeout: 15_000 });
  return parseDig(stdout);
}

/** Parses dig's default output. */
export function parseDig(out: string): DigResult {
  const status = /status: ([A-Z]+)/.exec(out)?.[1] ?? 'NONE';
  const flags = (/;; flags: ([a-z ]*);/.exec(out)?.[1] ?? '').trim().split(/\s+/).filter(Boolean);
  const section = (title: string): DigRecord[] => {
    const m = new RegExp(`;; ${title} SECTION:\\n([\\s\\S]*?)(\\n\\n|$)`).exec(out);
    if (!m) return [];
    return m[1]!.split('\n').filter((l) => l && !l.startsWith(';')).map((l) => {
      const [name, ttl, , type, ...data] = l.split(/\s+/);
      return { name: name!, ttl: Number(ttl), type: type!, data: data.join(' ') };
    });
  };
  const edns = /^; EDNS: .*$/m.exec(out)?.[0];
  return { status, flags, answers: section('ANSWER'), authority: section('AUTHORITY'), edns, raw: out };
}

/** A tiny upstream resolver on loopback (UDP and TCP on one port): `records` by lowercase name, A and TXT. */
export async function startUpstream(records: Record<string, { A?: string; TXT?: string }>): Promise<{ host: string; port: number; queries: number; close(): Promise<void> }> {
  const answer = (msg: Buffer): Buffer => {
    const q = packet.decode(msg);
    const question = q.questions?.[0];
    const rec = question ? records[question.name.toLowerCase()] : undefined;
    const answers: packet.Answer[] = [];
    if (question && rec?.A && question.type === 'A') answers.push({ type: 'A', name: question.name, ttl: 60, data: rec.A });
    if (question && rec?.TXT && question.type === 'TXT') answers.push({ type: 'TXT', name: question.name, ttl: 60, data: rec.TXT });
    return packet.encode({ type: 'response', id: q.id ?? 0, flags: packet.RECURSION_AVAILABLE | (rec ? 0 : 3), questions: q.questions ?? [], answers });
  };
  const state = { queries: 0 };
  const handle = (udp: ReturnType<typeof createSocket>) => udp.on('message', (msg, r) => {
    state.queries++;
    try {
      udp.send(answer(msg), r.port, r.address);
    } catch {
      // not a query it can decode: no answer
    }
  });
  const tcp = createServer((s) => {
    s.on('error', () => s.destroy());
    s.once('data', (d: Buffer) => {
      state.queries++;
      let out: Buffer;
      try {
        out = answer(d.subarray(2, 2 + d.readUInt16BE(0)));
      } catch {
        return void s.destroy();
      }
      const len = Buffer.alloc(2);
      len.writeUInt16BE(out.length);
      s.end(Buffer.concat([len, out]));
    });
  });
  // A random UDP port whose TCP twin someone else holds: try another pair.
  let udp: ReturnType<typeof createSocket> | undefined;
  let port = 0;
  for (let attempt = 1; !udp; attempt++) {
    const u = handle(createSocket('udp4'));
    await new Promise<void>((resolve) => u.bind(0, '127.0.0.1', resolve));
    port = u.address().port;
    try {
      await new Promise<void>((resolve, reject) => {
        tcp.once('error', reject);
        tcp.listen(port, '127.0.0.1', () => {
          tcp.off('error', reject);
          resolve();
        });
      });
      udp = u;
    } catch (e) {
      u.close();
      if (attempt >= 5) throw e;
    }
  }
  const bound = udp;
  return {
    host: '127.0.0.1', port,
    get queries() { return state.queries; },
    close: async () => {
      await Promise.all([new Promise<void>((r) => bound.close(() => r())), new Promise<void>((r) => tcp.close(() => r()))]);
    },
  };
}
