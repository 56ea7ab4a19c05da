// The benchmark's processes: nginx and HAProxy in temp dirs, Node peers as children, readiness, CPU accounting and stopping.
import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { isAbsolute, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort } from '../../test/helpers/registry.ts';

/** A process the benchmark started and must stop. */
export interface Peer {
  readonly name: string;
  readonly port: number;
  readonly pid: number;
  stop(): Promise<void>;
}

const repoRoot = fileURLToPath(new URL('../../', import.meta.url));
const live = new Set<ChildProcess>();
// If the harness dies on an exception, no server outlives it.
process.once('exit', () => { for (const c of live) c.kill('SIGKILL'); });

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1');
    s.once('connect', () => { s.destroy(); resolve(true); });
    s.once('error', () => resolve(false));
  });
}

function track(name: string, child: ChildProcess): { exited: Promise<void>; stderr: () => string } {
  live.add(child);
  let err = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (d: string) => { if (err.length < 8192) err += d; });
  const exited = new Promise<void>((resolve) => child.once('exit', () => { live.delete(child); resolve(); }));
  child.once('error', (e) => { err += `${name}: ${e.message}`; });
  return { exited, stderr: () => err };
}

async function stopChild(child: ChildProcess, exited: Promise<void>, signal: NodeJS.Signals): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill(signal);
  let timer: NodeJS.Timeout | undefined;
  const killed = new Promise<void>((resolve) => { timer = setTimeout(() => { child.kill('SIGKILL'); resolve(); }, 5_000); });
  await Promise.race([exited, killed]);
  clearTimeout(timer);
  await exited;
}

/** Starts a server that listens on a known port; resolves once the port accepts connections. */
/** Starts `cmd` and resolves once `port` accepts connections; stopping sends `stopSignal`. */
export async function startListening(name: string, cmd: string, args: string[], port: number, stopSignal: NodeJS.Signals): Promise<Peer> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const { exited, stderr } = track(name, child);
  const deadline = Date.now() + 10_000;
  while (!(await canConnect(port))) {
    if (child.exitCode !== null || Date.now() > deadline) {
      await stopChild(child, exited, 'SIGKILL');
      throw new Error(`${name} did not start listening on ${port}: ${stderr()}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return { name, port, pid: child.pid!, stop: () => stopChild(child, exited, stopSignal) };
}

/** Starts a Node script (through tsx; a name in bench/proxy, or an absolute path) that prints `{"port":N}` on its first stdout line when ready; `env` adds to the environment. */
export async function startNodeScript(name: string, script: string, args: string[], nodeArgs: string[] = [], env: Record<string, string> = {}): Promise<Peer> {
  const child = spawn(process.execPath, [...nodeArgs, '--import', 'tsx', isAbsolute(script) ? script : join(repoRoot, 'bench/proxy', script), ...args], {
    cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NODE_ENV: 'production', ...env },
  });
  const { exited, stderr } = track(name, child);
  const port = await new Promise<number>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`${name} did not start in time: ${stderr()}`)), 30_000);
    child.stdout!.setEncoding('utf8');
    child.stdout!.on('data', (d: string) => {
      out += d;
      const nl = out.indexOf('\n');
      if (nl === -1) return;
      clearTimeout(timer);
      try { resolve((JSON.parse(out.slice(0, nl)) as { port: number }).port); } catch (e) { reject(e as Error); }
    });
    void exited.then(() => { clearTimeout(timer); reject(new Error(`${name} exited before it was ready: ${stderr()}`)); });
  }).catch(async (e: unknown) => { await stopChild(child, exited, 'SIGKILL'); throw e; });
  return { name, port, pid: child.pid!, stop: () => stopChild(child, exited, 'SIGTERM') };
}

/** nginx answering `return 200` on loopback: the fast backend every target drives. One worker. */
export async function startNginxBackend(dir: string): Promise<Peer> {
  const port = await freePort();
  const conf = `${nginxCommon(dir, 1)}
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:${port} reuseport backlog=4096;
    location / { default_type text/plain; return 200 "ok\\n"; }
  }
}
`;
  return startNginx('backend nginx', dir, 'backend.conf', conf, port);
}

/** nginx as a reverse proxy to the backend with a keep-alive upstream, one worker per core. */
export async function startNginxProxy(dir: string, backendPort: number): Promise<Peer> {
  const port = await freePort();
  const conf = `${nginxCommon(dir, 'auto')}
http {
  access_log off;
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:${backendPort}; keepalive 128; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:${port} backlog=4096;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }
  }
}
`;
  return startNginx('nginx', dir, 'proxy.conf', conf, port);
}

/** The top of an nginx config: `workers` processes of `connections` each, log and pid file in `dir`. */
export function nginxCommon(dir: string, workers: number | 'auto', connections = 4096): string {
  return `worker_processes ${workers};
error_log ${dir}/nginx-error.log warn;
pid ${dir}/nginx-${Math.random().toString(36).slice(2)}.pid;
events { worker_connections ${connections}; }`;
}

/** Writes `conf` to `dir`/`file` and runs nginx on it in the foreground until stopped. */
export async function startNginx(name: string, dir: string, file: string, conf: string, port: number): Promise<Peer> {
  const path = join(dir, file);
  await writeFile(path, conf);
  return startListening(name, 'nginx', ['-p', `${dir}/`, '-c', path, '-e', `${dir}/nginx-error.log`, '-g', 'daemon off;'], port, 'SIGTERM');
}

/** What a benchmark changes in the HAProxy config: its lines are added, replacing the `timeout X` or `maxconn` line they set. */
export interface HaproxyTuning {
  /** Config file name (several HAProxy configs in one dir). Default haproxy.cfg. */
  file?: string;
  /** `global` section lines, e.g. `maxconn 12000`. */
  global?: string[];
  /** `defaults` section lines, e.g. `timeout client 60s`. */
  defaults?: string[];
}

/** Lines of `base` that `over` does not replace (same `timeout X`, or `maxconn`), then `over`. */
function tune(base: string[], over: string[] = []): string[] {
  const key = (line: string) => (/^(timeout \S+|maxconn)\b/.exec(line)?.[1] ?? line);
  const overridden = new Set(over.map(key));
  return [...base.filter((l) => !overridden.has(key(l))), ...over];
}

/**
 * HAProxy in http mode with keep-alive and connection reuse to the backend, one thread per core (its default);
 * `tuning` adjusts it for one benchmark.
 */
export async function startHaproxy(dir: string, backendPort: number, tuning: HaproxyTuning = {}): Promise<Peer> {
  const port = await freePort();
  const path = join(dir, tuning.file ?? 'haproxy.cfg');
  const global = tune(['maxconn 4096'], tuning.global);
  const defaults = tune([
    'mode http', 'option http-keep-alive', 'option forwardfor', 'http-reuse always',
    'timeout connect 5s', 'timeout client 30s', 'timeout server 30s',
  ], tuning.defaults);
  await writeFile(path, `global
${global.map((l) => `  ${l}`).join('\n')}
defaults
${defaults.map((l) => `  ${l}`).join('\n')}
frontend fe
  bind 127.0.0.1:${port}
  default_backend be
backend be
  server b1 127.0.0.1:${backendPort}
`);
  return startListening('HAProxy', 'haproxy', ['-db', '-f', path], port, 'SIGTERM');
}

/** nginx terminating TLS 1.2/1.3 with `cert`/`key` and answering 200 itself; no session cache or tickets (every handshake is new). */
export async function startNginxTls(dir: string, cert: string, key: string): Promise<Peer> {
  const port = await freePort();
  const conf = `${nginxCommon(dir, 'auto')}
http {
  access_log off;
  server {
    listen 127.0.0.1:${port} ssl backlog=4096;
    ssl_certificate ${cert};
    ssl_certificate_key ${key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    location / { default_type text/plain; return 200 "ok\\n"; }
  }
}
`;
  return startNginx('nginx TLS', dir, 'tls.conf', conf, port);
}

/** HAProxy terminating TLS 1.2/1.3 with `pem` (certificate and key in one file), answering 200 itself; no session cache or tickets. */
export async function startHaproxyTls(dir: string, pem: string): Promise<Peer> {
  const port = await freePort();
  const path = join(dir, 'haproxy-tls.cfg');
  await writeFile(path, `global
  maxconn 4096
  tune.ssl.cachesize 0
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:${port} ssl crt ${pem} ssl-min-ver TLSv1.2 no-tls-tickets
  http-request return status 200 content-type text/plain string ok
`);
  return startListening('HAProxy TLS', 'haproxy', ['-db', '-f', path], port, 'SIGTERM');
}

/** Clock ticks per second of /proc times (USER_HZ; 100 on Linux). */
const ticksPerSecond = 100;

/** CPU seconds (user + system) used so far by `pid` and all its descendants, including children they already reaped. */
export function treeCpuSeconds(pid: number): number {
  const parent = new Map<number, number>();
  const ticks = new Map<number, number>();
  for (const entry of readdirSync('/proc')) {
    const p = Number(entry);
    if (!Number.isInteger(p)) continue;
    let stat: string;
    try { stat = readFileSync(`/proc/${p}/stat`, 'latin1'); } catch { continue; }
    // Fields after the parenthesised command name, which may itself contain spaces.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    parent.set(p, Number(f[1]));
    ticks.set(p, Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]));
  }
  let total = 0;
  for (const [p, t] of ticks) {
    for (let q: number | undefined = p; q !== undefined && q > 1; q = parent.get(q)) {
      if (q === pid) { total += t; break; }
    }
  }
  return total / ticksPerSecond;
}
