// DNS benchmark: dnsperf against Tarmac's server (unbound engine, and the Node engine), dnsmasq and plain unbound serving the same `.internal` records, interleaved, as markdown.
import { execFileSync, spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { openSqliteCatalog, type Catalog } from '../../src/catalog/index.ts';
import { dig, writeFleet, type FixtureMachine } from '../../src/dns/testing.ts';
import { freePort } from '../../test/helpers/registry.ts';
import { waitFor } from '../../test/helpers/wait.ts';
import { machineDescription } from '../machine-start.ts';
import { treeCpuSeconds } from '../proxy/processes.ts';

const repoRoot = fileURLToPath(new URL('../../', import.meta.url));

interface Server {
  readonly name: string;
  readonly port: number;
  readonly pid: number;
  stop(): Promise<void>;
}

interface Run {
  qps: number;
  completed: number;
  lost: number;
  avgLatencyMs: number;
  maxLatencyMs: number;
  cpuSeconds: number;
}

/** The records every server serves: name → AAAA addresses or one TXT string. */
interface Records {
  aaaa: Map<string, string[]>;
  txt: Map<string, string>;
  missing: string[];
}

function envNumber(name: string): number | undefined {
  const v = process.env[name];
  return v === undefined || v === '' ? undefined : Number(v);
}

const median = (xs: readonly number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[s.length >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

/** 50 apps of 4 started machines in two regions: the fleet in a real catalog, and its records as the other servers get them. */
async function fleet(c: Catalog): Promise<Records> {
  const apps = Array.from({ length: 50 }, (_, i) => `app-${i}`);
  const machines: FixtureMachine[] = apps.flatMap((app, a) => [0, 1, 2, 3].map((k): FixtureMachine => ({
    id: `${a.toString(16).padStart(6, '0')}${k.toString(16).padStart(8, '0')}`, app, host: k < 2 ? 'h-ams' : 'h-fra',
    region: k < 2 ? 'ams' : 'fra', hostNumber: k < 2 ? 1 : 2, number: a * 4 + k + 1, state: 'started',
  })));
  const ips = await writeFleet(c, {
    orgs: [{ slug: 'personal', network: 1 }], hosts: [{ id: 'h-ams', region: 'ams', number: 1 }, { id: 'h-fra', region: 'fra', number: 2 }],
    apps: apps.map((name) => ({ name, org: 'personal' })), machines,
  });
  const records: Records = { aaaa: new Map(), txt: new Map(), missing: Array.from({ length: 10 }, (_, i) => `nope-${i}.internal`) };
  const add = (name: string, ip: string) => records.aaaa.set(name, [...(records.aaaa.get(name) ?? []), ip]);
  for (const app of apps) {
    const own = machines.filter((m) => m.app === app);
    for (const m of own) {
      add(`${app}.internal`, ips.get(m.id)!);
      add(`${m.region}.${app}.internal`, ips.get(m.id)!);
      add(`${m.id}.vm.${app}.internal`, ips.get(m.id)!);
    }
    records.txt.set(`vms.${app}.internal`, own.map((m) => `${m.id} ${m.region}`).join(','));
  }
  return records;
}

/** dnsperf's input: every name once (it loops over the file). */
function queryFile(r: Records): string {
  return [
    ...[...r.aaaa.keys()].map((n) => `${n} AAAA`), ...[...r.txt.keys()].map((n) => `${n} TXT`), ...r.missing.map((n) => `${n} AAAA`),
  ].join('\n') + '\n';
}

function dnsmasqConf(r: Records, port: number): string {
  return [
    `port=${port}`, 'listen-address=127.0.0.1', 'bind-interfaces', 'no-resolv', 'no-hosts', 'local=/internal/', 'local-ttl=5', 'user=root', 'pid-file=',
    ...[...r.aaaa].flatMap(([name, ips]) => ips.map((ip) => `host-record=${name},${ip}`)),
    ...[...r.txt].map(([name, text]) => `txt-record=${name},"${text}"`),
  ].join('\n') + '\n';
}

function unboundConf(r: Records, port: number, dir: string): string {
  return [
    'server:', '  interface: 127.0.0.1', `  port: ${port}`, '  do-daemonize: no', '  chroot: ""', '  username: ""', `  directory: "${dir}"`,
    '  pidfile: ""', '  use-syslog: no', '  logfile: ""', '  num-threads: 1', '  do-ip6: no', '  access-control: 127.0.0.0/8 allow',
    '  local-zone: "internal." static',
    ...[...r.aaaa].flatMap(([name, ips]) => ips.map((ip) => `  local-data: "${name}. 5 IN AAAA ${ip}"`)),
    ...[...r.txt].map(([name, text]) => `  local-data: '${name}. 5 IN TXT "${text}"'`),
    'remote-control:', '  control-enable: no',
  ].join('\n') + '\n';
}

/**
 * A Node UDP echo that sets QR on what it gets: not a DNS server, the floor of what one reply costs Node's dgram
 * (receive, send) on this machine, for reading Tarmac's numbers against.
 */
const nodeEcho = `const s = require('node:dgram').createSocket('udp4');
s.on('message', (m, r) => { m[2] |= 0x80; s.send(m, r.port, r.address); });
s.bind(Number(process.argv[1]), '127.0.0.1');`;

/** Starts a server process and waits until it answers a known name (with records unless `anyAnswer`). */
async function start(name: string, cmd: string, args: string[], port: number, probe: string, anyAnswer = false, reportsPid = false): Promise<Server> {
  const child = spawn(cmd, args, { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => { if (err.length < 4096) err += d; });
  // A server that reports {"pid":P} on its first stdout line is measured at P (Tarmac's unbound), else at its own pid.
  let reported: number | undefined;
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => {
    if (reported !== undefined || out.length > 4096) return;
    out += d;
    const line = out.split('\n')[0]!;
    if (out.includes('\n')) {
      try {
        reported = (JSON.parse(line) as { pid?: number }).pid ?? child.pid;
      } catch {
        reported = child.pid;
      }
    }
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    const t = setTimeout(() => child.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(t);
  };
  try {
    await waitFor(`${name} to answer`, async () => {
      if (child.exitCode !== null) throw new Error(`${name} exited: ${err}`);
      const r = await dig({ host: '127.0.0.1', port }, probe, 'AAAA', ['+time=1']);
      return (anyAnswer ? r.status === 'NOERROR' : r.answers.length > 0) && (!reportsPid || reported !== undefined);
    }, 30_000);
  } catch (e) {
    await stop();
    throw e;
  }
  return { name, port, pid: reported ?? child.pid!, stop };
}

function dnsperf(port: number, file: string, seconds: number): Omit<Run, 'cpuSeconds'> {
  const out = execFileSync('dnsperf', ['-s', '127.0.0.1', '-p', String(port), '-d', file, '-l', String(seconds), '-c', '4', '-q', '256'], { encoding: 'utf8' });
  const num = (re: RegExp) => Number(re.exec(out)?.[1] ?? NaN);
  return {
    qps: num(/Queries per second:\s+([\d.]+)/),
    completed: num(/Queries completed:\s+(\d+)/),
    lost: num(/Queries lost:\s+(\d+)/),
    avgLatencyMs: num(/Average Latency \(s\):\s+([\d.]+)/) * 1000,
    maxLatencyMs: num(/Average Latency \(s\):.*max ([\d.]+)/) * 1000,
  };
}

/** `cmd version` from the first "version X.Y" its output mentions. */
const version = (cmd: string, args: string[]) => {
  let out: string;
  try {
    out = execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    out = `${(e as { stdout?: string }).stdout ?? ''}${(e as { stderr?: string }).stderr ?? ''}`;
  }
  return `${cmd} ${/version:?\s+([\d.]+)/i.exec(out)?.[1] ?? '?'}`;
};

/** Runs the benchmark (about rounds x 3 servers x seconds) and returns the report. */
export async function benchDns(): Promise<string> {
  const rounds = envNumber('BENCH_DNS_ROUNDS') ?? 3;
  const seconds = envNumber('BENCH_DNS_SECONDS') ?? 5;
  const started = new Date();
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-bench-dns-'));
  const servers: Server[] = [];
  try {
    const catalogPath = join(dir, 'catalog.sqlite');
    const catalog = openSqliteCatalog(catalogPath);
    const records = await fleet(catalog);
    await catalog.close();
    const queries = join(dir, 'queries.txt');
    await writeFile(queries, queryFile(records));
    const [pt, pn, pm, pu, pe] = [await freePort(), await freePort(), await freePort(), await freePort(), await freePort()];
    await writeFile(join(dir, 'dnsmasq.conf'), dnsmasqConf(records, pm));
    await writeFile(join(dir, 'unbound.conf'), unboundConf(records, pu, dir));
    const probe = [...records.aaaa.keys()][0]!;
    const tarmacArgs = (engine: string, port: number) =>
      ['--import', 'tsx', join(repoRoot, 'bench/dns/server.ts'), catalogPath, String(port), engine, join(dir, `state-${engine}`)];
    servers.push(await start('tarmac', process.execPath, tarmacArgs('unbound', pt), pt, probe, false, true));
    servers.push(await start('tarmac-node', process.execPath, tarmacArgs('node', pn), pn, probe, false, true));
    servers.push(await start('dnsmasq', 'dnsmasq', ['-k', '-C', join(dir, 'dnsmasq.conf')], pm, probe));
    servers.push(await start('unbound', 'unbound', ['-d', '-c', join(dir, 'unbound.conf')], pu, probe));
    // Same answers everywhere before any timing.
    for (const name of [probe, `vms.${probe.replace(/\.internal$/, '')}.internal`]) {
      const type = name.startsWith('vms.') ? 'TXT' : 'AAAA';
      const seen = await Promise.all(servers.map(async (s) => (await dig({ host: '127.0.0.1', port: s.port }, name, type)).answers.map((a) => a.data).sort().join(' ')));
      if (new Set(seen).size !== 1) throw new Error(`servers disagree on ${name} ${type}: ${JSON.stringify(seen)}`);
    }
    servers.push(await start('node-echo', process.execPath, ['-e', nodeEcho, String(pe)], pe, probe, true));
    const runs = new Map<string, Run[]>(servers.map((s) => [s.name, []]));
    for (let round = 0; round < rounds; round++) {
      for (const s of servers) {
        const cpu0 = treeCpuSeconds(s.pid);
        const r = dnsperf(s.port, queries, seconds);
        runs.get(s.name)!.push({ ...r, cpuSeconds: treeCpuSeconds(s.pid) - cpu0 });
      }
    }
    const row = (name: string) => {
      const rs = runs.get(name)!;
      const perCpu = rs.map((r) => r.completed / Math.max(r.cpuSeconds, 0.01));
      return `| ${name} | ${median(rs.map((r) => r.qps)).toFixed(0)} | ${median(perCpu).toFixed(0)} | ${median(rs.map((r) => r.avgLatencyMs)).toFixed(3)} | ${median(rs.map((r) => r.maxLatencyMs)).toFixed(1)} | ${rs.reduce((a, r) => a + r.lost, 0)} |`;
    };
    const perCpu = (name: string) => median(runs.get(name)!.map((r) => r.completed / Math.max(r.cpuSeconds, 0.01)));
    const ratio = perCpu('tarmac') / perCpu('dnsmasq');
    const nodeRatio = perCpu('tarmac-node') / perCpu('dnsmasq');
    return `# Internal DNS (issue 5)

Run ${started.toISOString()} on: ${machineDescription()}.
Servers: Tarmac's DNS server with its default engine, unbound: ${version('unbound', ['-V'])} (one thread) started by Tarmac, with the zone
compiled from an embedded SQLite catalog into unbound views (one per organization, one for trusted sources) and kept
current over its control socket; Tarmac's Node engine (\`tarmac-node\`: Node ${process.version}, one process, the fallback where
unbound is not installed); ${version('dnsmasq', ['--version'])}; plain unbound (one thread, the records as \`local-data\` in a static zone).
Load: ${version('dnsperf', ['-h'])} on the same two cores, 4 sockets, 256 queries outstanding, ${seconds} s per run, ${rounds} rounds interleaved (${servers.map((s) => s.name).join(', ')},
repeat); medians. Records: 50 apps x 4 started machines in 2 regions, served identically by all
(dnsmasq \`host-record\`/\`txt-record\`, unbound \`local-data\`): \`<app>.internal\`, \`<region>.<app>.internal\`,
\`<id>.vm.<app>.internal\` AAAA, \`vms.<app>.internal\` TXT, and 10 names that do not exist; ${records.aaaa.size + records.txt.size + records.missing.length}
names, looped (Tarmac also holds every other name form: \`top<N>.nearest.of\`, \`_instances\`, ...). "lost" is what dnsperf
reported lost over all rounds. Queries per CPU second = queries completed / (utime + stime of the process answering during
the run): for \`tarmac\` the unbound process Tarmac started (Tarmac's own Node process is idle while the catalog does not
change), for \`tarmac-node\` the Node process.

| server | queries/s | queries per CPU second | avg latency ms | max latency ms | lost |
|---|---|---|---|---|---|
${servers.map((s) => row(s.name)).join('\n')}

Tarmac / dnsmasq queries per CPU second: ${ratio.toFixed(2)} (target: at least 1); with the Node engine: ${nodeRatio.toFixed(2)}.
node-echo is not a DNS server: a Node UDP socket that returns each query with QR set, the least a reply costs Node 20's
dgram here (tarmac-node / node-echo: ${(perCpu('tarmac-node') / perCpu('node-echo')).toFixed(2)}). It is why the Node engine cannot reach the target: a
CPU profile of it under dnsperf put its own query path (parse, view, answer-cache lookup, splice) at about 3% of its
CPU and Node's dgram send (\`doSend\`) at about 35%. So the datagrams are now answered by unbound, and Tarmac stays the
brain: it compiles its zone (every Fly name form, views per org by source address) into unbound and applies each catalog
change as a few commands on its control socket (the unbound-control protocol).
`;
  } finally {
    for (const s of servers) await s.stop();
    await rm(dir, { recursive: true, force: true });
  }
}
