// `tarmac host` as a real child process (to kill it at awkward moments), and what a machine leaves on the system.
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readFile, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import Database from 'better-sqlite3';
import { TarmacClient } from '../../src/client/index.ts';

const bin = new URL('../../bin/tarmac.mjs', import.meta.url).pathname;
const run = promisify(execFile);

/** Runtime root of the runc driver (src/orchestrator/drivers/runc.ts). */
export const RUNC_ROOT = '/run/tarmac/runc';

export interface HostProcess {
  child: ChildProcess;
  apiUrl: string;
  client: TarmacClient;
  /** Everything the host wrote to stderr (logs and banner). */
  stderr(): string;
  /** SIGKILL: no shutdown code runs, as in a crash or an OOM kill of the host. */
  kill(): Promise<void>;
  /** SIGINT (Ctrl-C); resolves with the exit code. */
  stop(): Promise<number | null>;
}

export interface HostProcessOptions {
  env?: Record<string, string>;
  logLevel?: string;
  timeoutMs?: number;
  /** Flags instead of the default free loopback listeners (`--api-listen 127.0.0.1:0` and so on). */
  args?: string[];
  /** Command prefix to run the host under, e.g. `nsenter --net=/var/run/netns/NS` to put it in a network namespace. */
  wrap?: string[];
}

/**
 * Starts `tarmac host` on `dataDir` (free loopback ports unless `args` say otherwise) and waits for its ready banner.
 * `apiUrl` is empty for a host without the api role.
 */
export async function startHostProcess(dataDir: string, opts: HostProcessOptions = {}): Promise<HostProcess> {
  const flags = opts.args ?? ['--api-listen', '127.0.0.1:0', '--proxy-listen', '127.0.0.1:0', '--metrics-listen', '127.0.0.1:0'];
  const [cmd, ...prefix] = [...(opts.wrap ?? []), process.execPath];
  const child = spawn(cmd!, [
    ...prefix, bin, 'host', '--data-dir', dataDir, '--no-install', '--log-level', opts.logLevel ?? 'warn', ...flags,
  ], { env: { ...process.env, TARMAC_API_TOKEN: '', ...opts.env }, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  let exited = false;
  const exit = once(child, 'exit').then(() => {
    exited = true;
  });
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (d: string) => (err += d));
  const apiUrl = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`host did not start within ${opts.timeoutMs ?? 60_000} ms: ${err}`));
    }, opts.timeoutMs ?? 60_000);
    const onData = () => {
      if (!err.includes('Press Ctrl-C to stop.')) return;
      clearTimeout(timer);
      child.stderr!.off('data', onData);
      resolve(/Machines API\s+(http:\/\/\S+)\/v1/.exec(err)?.[1] ?? '');
    };
    child.stderr!.on('data', onData);
    void exit.then(() => {
      clearTimeout(timer);
      reject(new Error(`host exited before it was ready: ${err}`));
    });
  });
  let token = opts.env?.['TARMAC_API_TOKEN'] ?? '';
  if (!token) {
    token = await readFile(join(dataDir, 'admin-token'), 'utf8').then((s) => s.trim(), async (e: unknown) => {
      child.kill('SIGKILL'); // never leave a host running behind a failed start
      await exit;
      throw e;
    });
  }
  return {
    child,
    apiUrl,
    client: new TarmacClient({ baseUrl: apiUrl, token }),
    stderr: () => err,
    async kill() {
      if (!exited) child.kill('SIGKILL');
      await exit;
    },
    async stop() {
      if (!exited) child.kill('SIGINT');
      await exit;
      return child.exitCode;
    },
  };
}

/** The host's durable instance row of a machine (read straight from its orchestrator.sqlite), or undefined. */
export function instanceRow(dataDir: string, machineId: string): { step: string; instance_id: string; restarts: number } | undefined {
  let db: Database.Database | undefined;
  try {
    db = new Database(join(dataDir, 'orchestrator.sqlite'), { readonly: true, fileMustExist: true });
    return db.prepare('SELECT step, instance_id, restarts FROM instances WHERE machine_id = ?').get(machineId) as
      { step: string; instance_id: string; restarts: number } | undefined;
  } catch {
    return undefined; // not created yet, or busy for a moment
  } finally {
    db?.close();
  }
}

export interface Container {
  id: string;
  pid: number;
  status: string;
  bundle: string;
}

/** Containers the runc driver's runtime root holds. */
export async function runcContainers(): Promise<Container[]> {
  const { stdout } = await run('runc', ['--root', RUNC_ROOT, 'list', '-f', 'json']).catch(() => ({ stdout: 'null' }));
  return (JSON.parse(stdout.trim() || 'null') as Container[] | null) ?? [];
}

/** Pids of conmon processes that monitor container `id`. */
export async function conmonPids(id: string): Promise<number[]> {
  const out: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const argv = (await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (argv[0]?.endsWith('conmon') && argv.includes(id)) out.push(Number(name));
  }
  return out;
}

/** Network namespace name of a machine (src/orchestrator/network.ts: `tm-` and 12 characters of the id). */
export const netnsOf = (id: string) => `tm-${id.slice(0, 12)}`;

/** Everything a machine left on the system: containers, monitors, namespaces, mounts under `dataDir`, cgroups. Empty when clean. */
export async function machineDebris(dataDir: string, ids: Iterable<string>): Promise<string[]> {
  const found: string[] = [];
  const containers = await runcContainers();
  const namespaces = await readdir('/var/run/netns').catch(() => [] as string[]);
  const controllers = await readdir('/sys/fs/cgroup').catch(() => [] as string[]);
  for (const id of ids) {
    for (const c of containers.filter((c) => c.id === id)) found.push(`container ${id} (${c.status})`);
    for (const pid of await conmonPids(id)) found.push(`conmon ${pid} of ${id}`);
    if (namespaces.includes(netnsOf(id))) found.push(`namespace ${netnsOf(id)}`);
    for (const c of controllers) {
      const dir = `/sys/fs/cgroup/${c}/tarmac/${id}`;
      if (await readdir(dir).then(() => true, () => false)) found.push(`cgroup ${dir}`);
    }
  }
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
  for (const line of mountinfo.split('\n')) {
    const point = line.split(' ')[4];
    if (point?.startsWith(dataDir + '/')) found.push(`mount ${point}`);
  }
  return found;
}

/**
 * Removes whatever machines `ids` left behind, without the host: for t.after, so that a failed test leaves no debris.
 * Touches only those machines and mounts under `dataDir` (other hosts may run on this machine), then deletes `dataDir`.
 */
export async function removeDebris(dataDir: string, ids: Iterable<string>): Promise<void> {
  const quiet = (p: Promise<unknown>) => p.catch(() => {});
  for (const id of ids) {
    await quiet(run('runc', ['--root', RUNC_ROOT, 'delete', '--force', id]));
    for (const pid of await conmonPids(id)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone */
      }
    }
  }
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
  const points = mountinfo.split('\n').map((l) => l.split(' ')[4]).filter((p): p is string => !!p && p.startsWith(dataDir + '/'));
  for (const p of points.reverse()) await quiet(run('umount', ['-l', p]));
  const controllers = await readdir('/sys/fs/cgroup').catch(() => [] as string[]);
  for (const id of ids) {
    for (const c of controllers) await quiet(run('rmdir', [`/sys/fs/cgroup/${c}/tarmac/${id}`]));
    await quiet(run('ip', ['netns', 'del', netnsOf(id)]));
    await rm(`/run/tarmac/netns/${netnsOf(id)}`, { force: true });
  }
  await rm(dataDir, { recursive: true, force: true });
}
