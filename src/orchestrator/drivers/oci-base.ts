// What every OCI-runtime driver shares: overlay root, bundle, conmon as the per-machine monitor, exit/OOM watching, recover, remove.
import { spawn, execFile } from 'node:child_process';
import { watch, openSync, closeSync, type FSWatcher } from 'node:fs';
import { mkdir, writeFile, readFile, rm, access, rmdir, stat } from 'node:fs/promises';
import { join, dirname, isAbsolute, delimiter } from 'node:path';
import type { Driver, RunSpec, RunningMachine, ExitStatus } from '../driver.ts';
import { privateDnsAddress } from '../../catalog/index.ts';
import { TarmacError } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';
import { buildOciSpec, type OciSpecOptions } from './oci-spec.ts';

export interface OciDriverOptions {
  /** Runtime binary (name on PATH or absolute path). */
  runtime?: string;
  /** Runtime state directory (`--root`). */
  root?: string;
  log: Logger;
  /** conmon binary. */
  conmon?: string;
  /** Static tini, bind-mounted into every machine as its PID 1. */
  tini?: string;
}

/** What a driver writes to `stateDir/driver.json` so a later host process can find the instance again. */
interface SavedState {
  containerId: string;
  driver: string;
  conmonPid: number;
  pid: number;
  startedAt: string;
}

/** Cgroup v1 controllers the drivers limit. */
export const CGROUP_CONTROLLERS = ['memory', 'cpu', 'pids'] as const;
export const CGROUP_ROOT = '/sys/fs/cgroup';

export interface Exec {
  stdout: string;
  stderr: string;
}

/** Runs a program; rejects with its stderr on a non-zero exit. */
export function run(cmd: string, args: string[], opts: { timeoutMs?: number } = {}): Promise<Exec> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: opts.timeoutMs ?? 30_000, maxBuffer: 4 << 20 }, (err, stdout, stderr) => {
      if (err) reject(Object.assign(new Error(`${cmd} ${args.join(' ')}: ${String(stderr).trim() || err.message}`), { stderr: String(stderr), cause: err }));
      else resolve({ stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

export async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}

/** Absolute path of `bin`, searched on PATH (conmon wants an absolute runtime path). */
export async function resolveBinary(bin: string): Promise<string> {
  if (isAbsolute(bin)) return bin;
  const dirs = (process.env['PATH'] ?? '').split(delimiter).concat(['/usr/sbin', '/usr/bin', '/sbin', '/bin', '/usr/local/bin']);
  for (const d of dirs) {
    const p = join(d, bin);
    if (await exists(p)) return p;
  }
  throw new TarmacError('failed_precondition', `${bin} is not installed: install it (apt-get install ${bin}) or configure the driver's binary path`);
}

function pidAlive(pid: number): boolean {
  if (!(pid > 0)) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** True when `pid` is a conmon monitoring container `containerId` (guards against a recycled pid). */
async function isOurConmon(pid: number, containerId: string): Promise<boolean> {
  const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  const argv = cmdline.split('\0');
  return argv.some((a) => a.endsWith('conmon')) && argv.includes(containerId);
}

const SIGNALS: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGKILL: 9, SIGUSR1: 10, SIGUSR2: 12, SIGTERM: 15, SIGSTOP: 19 };

/** "SIGTERM", "TERM", "15" → "TERM" as runtimes take it. */
export function signalName(signal: string): string {
  const s = signal.trim().toUpperCase();
  if (/^\d+$/.test(s)) return s;
  const name = s.startsWith('SIG') ? s : `SIG${s}`;
  if (!(name in SIGNALS) && !/^SIG(RTMIN|RTMAX|[A-Z]+)/.test(name)) throw new TarmacError('invalid_argument', `unknown signal ${signal}`);
  return name.slice(3);
}

/** Layout of a driver's state directory. */
export function statePaths(stateDir: string) {
  return {
    upper: join(stateDir, 'upper'),
    work: join(stateDir, 'work'),
    rootfs: join(stateDir, 'rootfs'),
    bundle: join(stateDir, 'bundle'),
    etc: join(stateDir, 'etc'),
    exitDir: join(stateDir, 'exit'),
    persist: join(stateDir, 'persist'),
    saved: join(stateDir, 'driver.json'),
    conmonPid: join(stateDir, 'conmon.pid'),
    containerPid: join(stateDir, 'container.pid'),
    conmonLog: join(stateDir, 'conmon.log'),
  };
}

async function isMountPoint(path: string): Promise<boolean> {
  const info = await readFile('/proc/self/mountinfo', 'utf8');
  return info.split('\n').some((l) => l.split(' ')[4] === path);
}

async function unmount(path: string): Promise<void> {
  for (let i = 0; i < 5 && (await isMountPoint(path)); i++) {
    await run('umount', i < 3 ? [path] : ['-l', path]).catch(() => {});
  }
  if (await isMountPoint(path)) throw new Error(`could not unmount ${path}`);
}

/** Polls `cond` until true or the deadline; for processes to go away, which nothing notifies. */
async function waitFor(cond: () => boolean | Promise<boolean>, timeoutMs: number, stepMs = 20): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await cond()) return true;
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, stepMs));
  }
}

/**
 * A driver on an OCI runtime (runc, crun, runsc) with Debian's conmon as the monitor of each machine: conmon
 * daemonizes, holds the machine's stdio, writes k8s-file logs to spec.logPath and the exit code to stateDir/exit,
 * so machines and their logs survive the host process. Subclasses say how the runtime is invoked.
 */
export abstract class OciRuntimeDriver implements Driver {
  abstract readonly name: string;
  protected readonly log: Logger;
  protected readonly runtimeBin: string;
  protected readonly root: string;
  private readonly conmonBin: string;
  private readonly tini: string;
  /**
   * Exit watchers of attached instances: `settle` reads the exit file once more, then resolves `exited` for good;
   * `release` stops watching without resolving (host shutdown).
   */
  private readonly watchers = new Map<string, Set<{ settle: () => Promise<void>; release: () => void }>>();

  constructor(opts: OciDriverOptions, defaults: { runtime: string; root: string }) {
    this.log = opts.log;
    this.runtimeBin = opts.runtime ?? defaults.runtime;
    this.root = opts.root ?? defaults.root;
    this.conmonBin = opts.conmon ?? 'conmon';
    this.tini = opts.tini ?? '/usr/bin/tini-static';
  }

  /** Global runtime flags placed before every subcommand (besides --root). */
  protected globalArgs(): string[] {
    return [];
  }
  /** How config.json joins the network and cgroups. */
  protected abstract specOptions(spec: RunSpec): Pick<OciSpecOptions, 'network' | 'cgroupsPath' | 'nprocLimit'>;
  /** The binary conmon runs for `create` (may be a wrapper script the subclass writes). */
  protected async createRuntime(_spec: RunSpec, _stateDir: string): Promise<string> {
    return resolveBinary(this.runtimeBin);
  }
  /** Cgroup directories holding the machine (one per controller), for OOM detection and removal. */
  protected abstract cgroupDirs(containerId: string): string[];
  /** Called before the runtime creates the container (e.g. to make cgroups the runtime does not). */
  protected async prepare(_spec: RunSpec, _stateDir: string): Promise<void> {}

  protected containerId(id: string): string {
    return id;
  }

  protected runtime(args: string[], timeoutMs?: number): Promise<Exec> {
    return run(this.runtimeBin, ['--root', this.root, ...this.globalArgs(), ...args], timeoutMs === undefined ? {} : { timeoutMs });
  }

  /** Host pids of started containers' init (or sandbox), by container id. */
  protected readonly pids = new Map<string, number>();

  /** Runs a runtime command that acts on a live container (start, kill, delete). */
  protected runtimeFor(_containerId: string, args: string[]): Promise<Exec> {
    return this.runtime(args);
  }

  async start(spec: RunSpec, signal?: AbortSignal): Promise<RunningMachine> {
    const t0 = performance.now();
    const id = this.containerId(spec.id);
    const p = statePaths(spec.stateDir);
    const log = this.log.child({ machine: spec.id, driver: this.name });
    if (!(await exists(spec.imageRootfs))) throw new TarmacError('failed_precondition', `image root filesystem ${spec.imageRootfs} does not exist: pull the image again`);
    if (!(await exists(spec.netnsPath))) throw new TarmacError('failed_precondition', `network namespace ${spec.netnsPath} does not exist`);
    if (!(await exists(this.tini))) throw new TarmacError('failed_precondition', `${this.tini} is missing: apt-get install tini`);
    // A leftover instance with the same id (crash mid-start) would make create fail: clear it first.
    if ((await exists(p.saved)) || (await exists(p.rootfs)) || (await this.hasRuntimeState(id))) {
      log.warn({ stateDir: spec.stateDir }, 'removing a leftover instance before start');
      await this.remove(spec.id, spec.stateDir);
    }
    try {
      signal?.throwIfAborted();
      await Promise.all([p.upper, p.work, p.rootfs, p.bundle, p.etc, p.exitDir, p.persist, dirname(spec.logPath), this.root].map((d) => mkdir(d, { recursive: true })));
      await run('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${spec.imageRootfs},upperdir=${p.upper},workdir=${p.work}`, p.rootfs]);
      const etcFiles = { resolvConf: join(p.etc, 'resolv.conf'), hosts: join(p.etc, 'hosts'), hostname: join(p.etc, 'hostname') };
      const config = buildOciSpec(spec, { rootfs: p.rootfs, tiniPath: this.tini, etcFiles, ...this.specOptions(spec) });
      await Promise.all([
        writeFile(etcFiles.resolvConf, `nameserver ${privateDnsAddress}\n`), // the host's DNS server (see network.ts)
        writeFile(etcFiles.hosts, spec.hosts),
        writeFile(etcFiles.hostname, spec.hostname + '\n'),
        writeFile(join(p.bundle, 'config.json'), JSON.stringify(config)),
        this.prepare(spec, spec.stateDir),
      ]);
      const createBin = await this.createRuntime(spec, spec.stateDir);
      signal?.throwIfAborted();
      const tMon = performance.now();
      const { pid, conmonPid } = await this.spawnConmon(id, spec, createBin, signal);
      const tCreated = performance.now();
      this.pids.set(id, pid);
      await this.runtimeFor(id, ['start', id]);
      const saved: SavedState = { containerId: id, driver: this.name, conmonPid, pid, startedAt: new Date().toISOString() };
      await writeFile(p.saved, JSON.stringify(saved));
      log.info(
        { pid, conmonPid, prepareMs: Math.round(tMon - t0), createMs: Math.round(tCreated - tMon), startMs: Math.round(performance.now() - tCreated) },
        'machine started',
      );
      return this.attach(spec.id, spec.stateDir, saved);
    } catch (e) {
      await this.remove(spec.id, spec.stateDir).catch((err: unknown) => log.warn({ err }, 'cleanup after failed start failed'));
      if (e instanceof TarmacError || signal?.aborted) throw e;
      throw new TarmacError('internal', `machine ${spec.id} failed to start with ${this.name}: ${(e as Error).message}`, { cause: e });
    }
  }

  /** Starts conmon, which runs `runtime create`, and waits for the container pid on the sync pipe. */
  private async spawnConmon(id: string, spec: RunSpec, createBin: string, signal?: AbortSignal): Promise<{ pid: number; conmonPid: number }> {
    const p = statePaths(spec.stateDir);
    const conmon = await resolveBinary(this.conmonBin);
    const args = [
      '--api-version', '1',
      '-c', id, '-u', id, '-n', id,
      '-r', createBin,
      '-b', p.bundle,
      '-p', p.containerPid,
      '-P', p.conmonPid,
      '-l', `k8s-file:${spec.logPath}`,
      '--exit-dir', p.exitDir,
      '--persist-dir', p.persist,
      '--socket-dir-path', spec.stateDir,
      '--runtime-arg', '--root', '--runtime-arg', this.root,
      ...this.globalArgs().flatMap((a) => ['--runtime-arg', a]),
      '--log-level', 'warning',
    ];
    const errFd = openSync(p.conmonLog, 'a');
    const child = spawn(conmon, args, {
      detached: true,
      stdio: ['ignore', 'ignore', errFd, 'pipe'],
      env: { PATH: process.env['PATH'] ?? '/usr/sbin:/usr/bin:/sbin:/bin', _OCI_SYNCPIPE: '3' },
      cwd: spec.stateDir,
    });
    closeSync(errFd);
    child.unref();
    const pipe = child.stdio[3] as NodeJS.ReadableStream & { destroy(): void };
    const message = await new Promise<string>((resolve, reject) => {
      let buf = '';
      const timer = setTimeout(() => done(new Error('conmon did not report the container pid within 30 s')), 30_000);
      const onAbort = () => done(signal?.reason ?? new Error('aborted'));
      signal?.addEventListener('abort', onAbort, { once: true });
      const done = (err: Error | null, value?: string) => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        pipe.destroy();
        if (err) reject(err);
        else resolve(value ?? '');
      };
      pipe.setEncoding('utf8');
      pipe.on('data', (d: string) => {
        buf += d;
        const line = buf.split('\n').find((l) => l.trim().startsWith('{') && l.includes('}'));
        if (line) done(null, line);
      });
      pipe.on('end', () => done(null, buf));
      pipe.on('error', (e: Error) => done(e));
      child.on('error', (e) => done(e));
    });
    let parsed: { data?: number; pid?: number; message?: string };
    try {
      parsed = JSON.parse(message.trim() || '{}') as typeof parsed;
    } catch {
      parsed = {};
    }
    const pid = parsed.data ?? parsed.pid ?? -1;
    if (!(pid > 0)) {
      const conmonLog = await readFile(p.conmonLog, 'utf8').catch(() => '');
      throw new Error(`runtime create failed: ${(parsed.message ?? conmonLog).trim() || 'no pid reported'}`);
    }
    const conmonPid = Number((await readFile(p.conmonPid, 'utf8').catch(() => '')).trim()) || 0;
    return { pid, conmonPid };
  }

  /** Reads how the instance ended from conmon's exit file; undefined while it runs. */
  private async readExit(containerId: string, stateDir: string): Promise<ExitStatus | undefined> {
    const p = statePaths(stateDir);
    const exitFile = join(p.exitDir, containerId);
    const text = await readFile(exitFile, 'utf8').catch(() => undefined);
    if (text === undefined || text.trim() === '') return undefined;
    const code = Number(text.trim());
    if (!Number.isInteger(code)) return undefined;
    const exitedAt = await stat(exitFile).then(
      (s) => s.mtime,
      () => new Date(),
    );
    const oomKilled = (await exists(join(p.persist, 'oom'))) || (await exists(join(p.bundle, 'oom'))) || (await this.cgroupOomKills(containerId)) > 0;
    const signal = code > 128 && code < 128 + 65 ? code - 128 : 0;
    return { code, signal, oomKilled, exitedAt };
  }

  /** OOM kills the memory cgroup counted (cgroup v1 `memory.oom_control`). */
  private async cgroupOomKills(containerId: string): Promise<number> {
    const dir = this.cgroupDirs(containerId).find((d) => d.startsWith(`${CGROUP_ROOT}/memory/`));
    if (!dir) return 0;
    const text = await readFile(join(dir, 'memory.oom_control'), 'utf8').catch(() => '');
    const m = /^oom_kill (\d+)$/m.exec(text);
    return m ? Number(m[1]) : 0;
  }

  /** Stops watching every attached instance (host shutdown): no watcher or timer keeps the process alive. */
  release(): void {
    for (const set of [...this.watchers.values()]) for (const w of [...set]) w.release();
  }

  /** A RunningMachine whose `exited` resolves from conmon's exit file (fs.watch, checked once after arming). */
  private attach(id: string, stateDir: string, saved: SavedState): RunningMachine {
    const containerId = saved.containerId;
    const p = statePaths(stateDir);
    const exited = new Promise<ExitStatus>((resolve) => {
      let watcher: FSWatcher | undefined;
      let settled = false;
      let checking = false;
      let again = false;
      const finish = (status: ExitStatus) => {
        if (settled) return;
        settled = true;
        cleanup();
        resolve(status);
      };
      const cleanup = () => {
        watcher?.close();
        clearInterval(liveness);
        const set = this.watchers.get(containerId);
        set?.delete(entry);
        if (set?.size === 0) this.watchers.delete(containerId);
      };
      // Used by remove(): the instance is gone, so whatever the exit file says (or a kill) is final.
      const entry = {
        settle: async () => {
          if (settled) return;
          const status = await this.readExit(containerId, stateDir);
          finish(status ?? { code: 137, signal: 9, oomKilled: false, exitedAt: new Date() });
        },
        release: () => {
          settled = true; // nothing resolves `exited` from here on: the host is going away
          cleanup();
        },
      };
      const check = async () => {
        if (settled) return;
        if (checking) {
          again = true;
          return;
        }
        checking = true;
        try {
          do {
            again = false;
            const status = await this.readExit(containerId, stateDir);
            if (status) return finish(status);
          } while (again);
          // A monitor that died without writing an exit file (killed, host reboot) leaves no code to read.
          if (saved.conmonPid > 0 && !pidAlive(saved.conmonPid)) {
            const status = await this.readExit(containerId, stateDir);
            finish(status ?? { code: 255, signal: 0, oomKilled: (await this.cgroupOomKills(containerId)) > 0, exitedAt: new Date() });
          }
        } finally {
          checking = false;
        }
      };
      try {
        watcher = watch(p.exitDir, () => void check());
        watcher.on('error', () => void check());
      } catch {
        // The state dir is gone (removed): the liveness check settles it.
      }
      // Only for a monitor that vanished without a word; the exit file itself is noticed by the watcher.
      const liveness = setInterval(() => void check(), 1000);
      liveness.unref();
      const set = this.watchers.get(containerId) ?? new Set();
      set.add(entry);
      this.watchers.set(containerId, set);
      void check();
    });
    this.pids.set(containerId, saved.pid);
    const kill = async (sig: string) => {
      await this.runtimeFor(containerId, ['kill', containerId, signalName(sig)]).catch(async (e: unknown) => {
        // Killing something that already exited is not an error.
        if (await this.readExit(containerId, stateDir)) return;
        const state = await this.runtimeState(containerId);
        if (state === undefined || state === 'stopped') return;
        throw e;
      });
    };
    return {
      id,
      pid: saved.pid,
      exited,
      kill,
      stop: async (sig, timeoutMs) => {
        let timer: NodeJS.Timeout | undefined;
        const timedOut = new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), Math.max(0, timeoutMs))));
        try {
          await kill(sig);
          const first = await Promise.race([exited, timedOut]);
          if (first === 'timeout') await kill('SIGKILL');
        } finally {
          clearTimeout(timer);
        }
        return exited;
      },
    };
  }

  /** `runtime state` status ("created", "running", "stopped", …) or undefined when the runtime does not know the id. */
  /**
   * Whether the runtime still holds state for a container, checked without spawning it: runc and crun keep one
   * directory per container under --root. Runtimes with another layout override this.
   */
  protected async hasRuntimeState(containerId: string): Promise<boolean> {
    return exists(join(this.root, containerId));
  }

  protected async runtimeState(containerId: string): Promise<string | undefined> {
    try {
      const { stdout } = await this.runtime(['state', containerId]);
      return (JSON.parse(stdout) as { status?: string }).status;
    } catch {
      return undefined;
    }
  }

  async recover(id: string, stateDir: string): Promise<RunningMachine | { exited: ExitStatus } | undefined> {
    const p = statePaths(stateDir);
    const savedText = await readFile(p.saved, 'utf8').catch(() => undefined);
    if (savedText === undefined) return undefined;
    const saved = JSON.parse(savedText) as SavedState;
    const done = await this.readExit(saved.containerId, stateDir);
    if (done) return { exited: done };
    const state = await this.runtimeState(saved.containerId);
    const monitorAlive = saved.conmonPid > 0 && pidAlive(saved.conmonPid) && (await isOurConmon(saved.conmonPid, saved.containerId));
    if (!monitorAlive) {
      // Nobody holds its stdio or will record its exit: stop what is left and report an unknown end.
      this.pids.set(saved.containerId, saved.pid);
      if (state !== undefined && state !== 'stopped') await this.runtimeFor(saved.containerId, ['kill', saved.containerId, 'KILL']).catch(() => {});
      const oom = (await this.cgroupOomKills(saved.containerId)) > 0;
      return { exited: (await this.readExit(saved.containerId, stateDir)) ?? { code: 255, signal: 0, oomKilled: oom, exitedAt: new Date() } };
    }
    // The host died between create and start: finish the start.
    this.pids.set(saved.containerId, saved.pid);
    if (state === 'created') await this.runtimeFor(saved.containerId, ['start', saved.containerId]);
    this.log.info({ machine: id, driver: this.name, state }, 'machine reattached');
    return this.attach(id, stateDir, saved);
  }

  async remove(id: string, stateDir: string): Promise<void> {
    const p = statePaths(stateDir);
    const saved = await readFile(p.saved, 'utf8').then(
      (t) => JSON.parse(t) as SavedState,
      () => undefined,
    );
    const containerId = saved?.containerId ?? this.containerId(id);
    if (saved && !this.pids.has(containerId)) this.pids.set(containerId, saved.pid);
    if ((await this.runtimeState(containerId)) !== undefined) {
      await this.runtimeFor(containerId, ['delete', '--force', containerId]).catch(async (e: unknown) => {
        if ((await this.runtimeState(containerId)) !== undefined) throw e;
      });
    }
    const conmonPid = saved?.conmonPid || Number((await readFile(p.conmonPid, 'utf8').catch(() => '')).trim()) || 0;
    if (conmonPid > 0 && (await isOurConmon(conmonPid, containerId))) {
      // conmon leaves by itself once the container is gone; do not wait long for it.
      if (!(await waitFor(() => !pidAlive(conmonPid), 2000))) {
        try {
          process.kill(conmonPid, 'SIGKILL');
        } catch {
          /* already gone */
        }
      }
    }
    await Promise.all([...(this.watchers.get(containerId) ?? [])].map((w) => w.settle()));
    if (await exists(p.rootfs)) await unmount(p.rootfs);
    this.pids.delete(containerId);
    await this.removeCgroups(containerId);
    await rm(stateDir, { recursive: true, force: true });
  }

  /** Removes the machine's cgroup directories (after its processes are gone). */
  protected async removeCgroups(containerId: string): Promise<void> {
    for (const dir of this.cgroupDirs(containerId)) {
      if (!(await exists(dir))) continue;
      const ok = await waitFor(async () => {
        await rmdir(dir).catch(() => {});
        return !(await exists(dir));
      }, 3000, 50);
      if (!ok) throw new Error(`could not remove cgroup ${dir}: processes still in it`);
    }
  }
}
