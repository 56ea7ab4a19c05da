// HAProxy run as a child in master-worker mode: config checks, hitless reloads, its runtime API, restart if it dies.
import { execFile, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, readdir, readFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { join } from 'node:path';
import { spawnTied } from '../../shared/child.ts';
import { TarmacError } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';

export const haproxyBinary = '/usr/sbin/haproxy';

/** How long a start or a reload may take before it is reported as failed. */
const readyTimeoutMs = 10_000;
/** How long one runtime API command may take. */
const commandTimeoutMs = 10_000;
const firstBackoffMs = 250;
const maxBackoffMs = 5000;
/** A master that ran at least this long before dying is restarted after the shortest pause again. */
const stableAfterMs = 30_000;
/** Lines kept from haproxy's output, for error messages. */
const recentLines = 30;
/** Lifecycle messages HAProxy prints as warnings on every reload or stop: logged at info. */
const routineWarning = /^(Proxy .* stopped|(Paused|Resumed) (frontend|backend|proxy) |Stopping (frontend|backend|proxy) |Former worker \(\d+\) exited with code 0|Exiting Master process|All workers exited|Current worker \(\d+\) exited with code 0)/;

export interface HaproxyProcessOptions {
  /** The config file, written by the caller before start() and before each reload(). */
  configPath: string;
  /** Where the master CLI socket lives (`master.sock`). */
  stateDir: string;
  /** The worker's runtime API socket: the config declares `stats socket <adminSocket> mode 600 level admin expose-fd listeners`. */
  adminSocket: string;
  log: Logger;
  /** The haproxy binary (default /usr/sbin/haproxy). */
  binary?: string;
  /** Called after HAProxy died unexpectedly and was started again (the caller re-syncs its runtime state). */
  onRestart?: () => void;
}

/** One line of haproxy's output: `[LEVEL]  (pid) : message`. */
interface OutputLine {
  level: string;
  pid: number | undefined;
  text: string;
}

/** A running HAProxy master (and its workers), kept running until close(). */
export class HaproxyProcess {
  readonly #opts: HaproxyProcessOptions;
  readonly #binary: string;
  readonly #masterSocket: string;
  #child: ChildProcess | undefined;
  #startedAt = 0;
  /** The worker that last answered on the admin socket, and every worker seen (stopped on close). */
  #worker: number | undefined;
  readonly #workers = new Set<number>();
  #recent: string[] = [];
  readonly #lineListeners = new Set<(line: OutputLine) => void>();
  /** Every (re)launch and reload, one at a time. */
  #queue: Promise<void> = Promise.resolve();
  /** A reload queued but not begun: further reload() calls join it. */
  #queuedReload: Promise<void> | undefined;
  #backoffMs = firstBackoffMs;
  #restartTimer: NodeJS.Timeout | undefined;
  #running = false;
  #closing: Promise<void> | undefined;

  private constructor(opts: HaproxyProcessOptions) {
    this.#opts = opts;
    this.#binary = opts.binary ?? haproxyBinary;
    this.#masterSocket = join(opts.stateDir, 'master.sock');
  }

  /** Checks the config, starts the master and resolves once a worker answers on the admin socket. */
  static async start(opts: HaproxyProcessOptions): Promise<HaproxyProcess> {
    const binary = opts.binary ?? haproxyBinary;
    if (!existsSync(binary)) throw new TarmacError('failed_precondition', `the haproxy data plane needs ${binary} (apt-get install haproxy)`);
    const p = new HaproxyProcess(opts);
    try {
      await mkdir(opts.stateDir, { recursive: true, mode: 0o700 });
      await chmod(opts.stateDir, 0o700); // the master CLI takes commands unauthenticated
      await p.#stopStale();
      await p.check();
      await p.#enqueue(() => p.#launch());
    } catch (e) {
      await p.close(0);
      throw e;
    }
    p.#running = true;
    return p;
  }

  /** The master's pid, while it runs. */
  get pid(): number | undefined {
    return this.#child?.pid;
  }

  /** Validates the config file (`haproxy -c`); rejects with haproxy's own error lines when it is invalid. */
  async check(): Promise<void> {
    const { code, output } = await run(this.#binary, ['-c', '-f', this.#opts.configPath]);
    if (code === 0) return;
    const lines = output.split('\n').filter((l) => l.trim() !== '').map(parseLine);
    const alerts = lines.filter((l) => l.level === 'ALERT');
    const text = (alerts.length > 0 ? alerts : lines).slice(0, 10).map((l) => shorten(l.text)).join(' | ');
    throw new TarmacError('invalid_argument', `haproxy config ${this.#opts.configPath} is invalid: ${text || `exit code ${code}`}`);
  }

  /**
   * Checks the config, then reloads the master and resolves once a new worker answers; old workers finish their
   * requests on their own. A reload asked while one is queued joins it.
   */
  reload(): Promise<void> {
    if (this.#queuedReload) return this.#queuedReload;
    const queued: Promise<void> = this.#enqueue(async () => {
      if (this.#queuedReload === queued) this.#queuedReload = undefined; // begun: a later change needs another
      await this.#reloadNow();
    });
    this.#queuedReload = queued;
    return queued;
  }

  /** One runtime API command on the admin socket; resolves with haproxy's text answer. */
  command(line: string): Promise<string> {
    if (/[\r\n]/.test(line)) return Promise.reject(new TarmacError('invalid_argument', 'a haproxy command is a single line'));
    return ask(this.#opts.adminSocket, line);
  }

  /** `show stat` as rows keyed by column name (pxname, svname, scur, stot, hrsp_2xx, ...). */
  async stats(): Promise<Record<string, string>[]> {
    return parseStatCsv(await this.command('show stat'));
  }

  /**
   * Soft stop: the master's listeners close and in-flight requests finish, for up to `drainMs`; then SIGTERM, then
   * SIGKILL. Every worker is gone when it resolves. No restart after it.
   */
  close(drainMs = 10_000): Promise<void> {
    this.#closing ??= this.#shutdown(drainMs);
    return this.#closing;
  }

  // ---- the process

  async #shutdown(drainMs: number): Promise<void> {
    if (this.#restartTimer) clearTimeout(this.#restartTimer);
    const child = this.#child;
    if (child) await stopMaster(child, drainMs);
    await this.#queue.catch(() => {});
    const late = this.#child; // a launch under way got further than the stop above
    if (late) await stopMaster(late, 0);
    this.#child = undefined;
    await Promise.all([...this.#workers].map((pid) => stopOrphan(pid)));
  }

  #enqueue(task: () => Promise<void>): Promise<void> {
    const next = this.#queue.then(task);
    this.#queue = next.catch(() => {});
    return next;
  }

  /** Spawns the master (dying with this process) and waits for its worker to answer `show info`. */
  async #launch(): Promise<void> {
    if (this.#closing) throw closedError();
    const args = ['-W', '-db', '-S', this.#masterSocket, '-f', this.#opts.configPath];
    this.#recent = [];
    const { child, exited } = spawnTied(this.#binary, args, (line) => this.#onOutput(line));
    this.#child = child;
    this.#startedAt = Date.now();
    void exited.then((how) => this.#onExit(child, how));
    try {
      await this.#waitWorker(child, exited, undefined, 'start');
    } catch (e) {
      await stopMaster(child, 0); // no answer in time, or closed meanwhile: this master must not outlive the failure
      if (this.#child === child) this.#child = undefined;
      throw e;
    }
    this.#opts.log.info({ pid: child.pid, worker: this.#worker }, 'haproxy serving');
  }

  async #reloadNow(): Promise<void> {
    await this.check();
    const child = this.#child;
    if (this.#closing) throw closedError();
    if (!child?.pid || child.exitCode !== null) throw new TarmacError('unavailable', 'haproxy is not running (it is being restarted with the current config)');
    const exited = new Promise<string>((resolve) => child.once('exit', (code, signal) => resolve(signal ? `signal ${signal}` : `exit code ${code}`)));
    const before = this.#worker;
    const started = Date.now();
    let listener: ((l: OutputLine) => void) | undefined;
    const failed = new Promise<string>((resolve) => {
      const alerts: string[] = [];
      listener = (l: OutputLine) => {
        if (l.pid !== child.pid) return;
        if (l.level === 'ALERT') alerts.push(l.text);
        if (/^Loading failure/.test(l.text)) resolve(alerts.slice(-5).join(' | ') || l.text);
      };
      this.#lineListeners.add(listener);
    });
    try {
      process.kill(child.pid, 'SIGUSR2');
      await this.#waitWorker(child, exited, before, 'reload', failed);
    } finally {
      if (listener) this.#lineListeners.delete(listener);
    }
    for (const pid of this.#workers) if (pid !== this.#worker && !(await running(pid))) this.#workers.delete(pid);
    this.#opts.log.info({ pid: child.pid, worker: this.#worker, was: before, ms: Date.now() - started }, 'haproxy reloaded');
  }

  /**
   * Resolves once a worker of `child` other than `previous` answers `show info` on the admin socket; rejects when the
   * master exits, when `failed` reports a failed load, or after the ready timeout.
   */
  async #waitWorker(child: ChildProcess, exited: Promise<string>, previous: number | undefined, what: 'start' | 'reload', failed?: Promise<string>): Promise<void> {
    let outcome: { how: 'exited' | 'failed'; detail: string } | undefined;
    void exited.then((detail) => { outcome ??= { how: 'exited', detail }; });
    void failed?.then((detail) => { outcome ??= { how: 'failed', detail }; });
    const deadline = Date.now() + readyTimeoutMs;
    for (;;) {
      if (this.#closing) throw closedError();
      if (outcome?.how === 'exited') {
        throw new TarmacError('unavailable', `haproxy ${what} failed, the master exited (${outcome.detail}): ${this.#recentText()}`);
      }
      if (outcome?.how === 'failed') {
        throw new TarmacError('invalid_argument', `haproxy ${what} failed, the old config keeps serving: ${outcome.detail}`);
      }
      const worker = await this.#workerOf(child.pid);
      if (worker !== undefined && worker !== previous) {
        this.#worker = worker;
        this.#workers.add(worker);
        return;
      }
      if (Date.now() > deadline) {
        throw new TarmacError('unavailable', `haproxy ${what}: no new worker answered on ${this.#opts.adminSocket} within ${readyTimeoutMs} ms: ${this.#recentText()}`);
      }
      await new Promise((r) => setTimeout(r, 25));
    }
  }

  /** The pid of the worker answering on the admin socket, when it is a child of `master`. */
  async #workerOf(master: number | undefined): Promise<number | undefined> {
    const info = await ask(this.#opts.adminSocket, 'show info', 1000).catch(() => '');
    const pid = Number(/^Pid: (\d+)$/m.exec(info)?.[1]);
    if (!Number.isInteger(pid) || pid <= 0) return undefined;
    return (await parentOf(pid)) === master ? pid : undefined;
  }

  /** The master exited: unless closing (or still starting), start it again after a growing pause. */
  #onExit(child: ChildProcess, how: string): void {
    if (this.#child !== child) return;
    this.#child = undefined;
    if (this.#closing || !this.#running) return;
    if (Date.now() - this.#startedAt > stableAfterMs) this.#backoffMs = firstBackoffMs;
    this.#opts.log.error({ how, last: this.#recent.slice(-3) }, 'haproxy exited, restarting it');
    this.#restartLater();
  }

  #restartLater(): void {
    if (this.#restartTimer || this.#closing) return;
    const wait = this.#backoffMs;
    this.#backoffMs = Math.min(this.#backoffMs * 2, maxBackoffMs);
    this.#restartTimer = setTimeout(() => {
      void this.#enqueue(async () => {
        if (this.#child || this.#closing) return;
        await Promise.all([...this.#workers].map((pid) => stopOrphan(pid))); // the dead master's workers stop listening first
        this.#workers.clear();
        await this.#launch();
        this.#opts.onRestart?.();
      }).catch((e: unknown) => {
        if (!this.#closing) this.#opts.log.error({ err: e }, 'haproxy restart failed');
      }).finally(() => {
        this.#restartTimer = undefined;
        if (!this.#child && !this.#closing) this.#restartLater();
      });
    }, wait);
  }

  /** A master left by an earlier run of this state dir (it answers on the master socket) is killed with its workers. */
  async #stopStale(): Promise<void> {
    // The master's own list where it answers, and any haproxy running this config (a master too busy to answer).
    const procs = await ask(this.#masterSocket, 'show proc', commandTimeoutMs).catch(() => '');
    const listed = [...procs.matchAll(/^(\d+)\s+(master|worker)\s/gm)].map((m) => Number(m[1]));
    const pids = [...new Set([...listed, ...(await haproxysRunning(this.#opts.configPath))])];
    if (pids.length === 0) return;
    this.#opts.log.warn({ pids }, 'stopping a haproxy left by an earlier run');
    await Promise.all(pids.map((pid) => stopOrphan(pid, 0)));
  }

  #onOutput(raw: string): void {
    const line = parseLine(raw);
    this.#recent.push(raw.trim());
    if (this.#recent.length > recentLines) this.#recent.shift();
    for (const listener of this.#lineListeners) listener(line);
    const fields = { haproxy: line.text, pid: line.pid };
    if (line.level === 'ALERT' || line.level === 'EMERG') this.#opts.log.error(fields, 'haproxy');
    else if (line.level === 'NOTICE' || line.level === 'DEBUG' || routineWarning.test(line.text)) this.#opts.log.info(fields, 'haproxy');
    else this.#opts.log.warn(fields, 'haproxy');
  }

  /** The last lines haproxy wrote, alerts first, for error messages. */
  #recentText(): string {
    const alerts = this.#recent.filter((l) => l.startsWith('[ALERT]'));
    return (alerts.length > 0 ? alerts : this.#recent).slice(-5).join(' | ') || 'no output';
  }
}

// ---- helpers

function closedError(): TarmacError {
  return new TarmacError('unavailable', 'haproxy closed');
}

/** A long message cut in its middle: haproxy puts what it found at the end ("... but got 'x'"). */
function shorten(text: string, max = 600): string {
  return text.length <= max ? text : `${text.slice(0, max / 2)} … ${text.slice(-max / 2)}`;
}

function parseLine(raw: string): OutputLine {
  const m = /^\[([A-Z]+)\]\s+\((\d+)\)\s*:\s?(.*)$/.exec(raw);
  if (!m) return { level: 'WARNING', pid: undefined, text: raw };
  return { level: m[1]!, pid: Number(m[2]), text: m[3]!.trim() };
}

/**
 * One command on a HAProxy CLI socket (the worker's runtime API or the master CLI): the line, then our side closed
 * (the 2.6 master CLI answers but keeps the connection open until the client shuts its side), then everything until
 * haproxy closes.
 */
function ask(socket: string, line: string, timeoutMs = commandTimeoutMs): Promise<string> {
  return new Promise((resolve, reject) => {
    const conn = connect(socket);
    let out = '';
    const timer = setTimeout(() => conn.destroy(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
    conn.setEncoding('utf8');
    conn.on('data', (d: string) => { out += d; });
    conn.once('error', (e) => {
      clearTimeout(timer);
      reject(new TarmacError('unavailable', `haproxy ${line.split(' ', 2).join(' ')} on ${socket}: ${e.message}`, { cause: e }));
    });
    conn.once('end', () => {
      clearTimeout(timer);
      conn.destroy();
      resolve(out);
    });
    conn.end(`${line}\n`);
  });
}

/** Pids of haproxy processes whose command line names `configPath`. */
async function haproxysRunning(configPath: string): Promise<number[]> {
  const pids: number[] = [];
  for (const entry of await readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(entry)) continue;
    const argv = (await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (argv[0]?.endsWith('haproxy') === true && argv.includes(configPath)) pids.push(Number(entry));
  }
  return pids;
}

function run(bin: string, args: string[]): Promise<{ code: number; output: string }> {
  return new Promise((resolve, reject) => {
    execFile(bin, args, { timeout: 30_000 }, (err, stdout, stderr) => {
      if (err && typeof err.code !== 'number') reject(new TarmacError('unavailable', `${bin} ${args.join(' ')}: ${err.message}`, { cause: err }));
      else resolve({ code: err ? Number(err.code) : 0, output: `${stderr}\n${stdout}` });
    });
  });
}

/** The parent pid of a running process (undefined once it is gone or a zombie). */
async function parentOf(pid: number): Promise<number | undefined> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // after "pid (comm) ": state, ppid, ...
  if (fields.length < 2 || fields[0] === 'Z') return undefined;
  return Number(fields[1]);
}

async function running(pid: number): Promise<boolean> {
  return (await parentOf(pid)) !== undefined;
}

/** Soft-stops the master (SIGUSR1), then SIGTERM after `drainMs`, then SIGKILL two seconds later; resolves once it exited. */
async function stopMaster(child: ChildProcess, drainMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const timers = [
    setTimeout(() => child.kill('SIGTERM'), drainMs),
    setTimeout(() => child.kill('SIGKILL'), drainMs + 2000),
  ];
  if (drainMs > 0) child.kill('SIGUSR1');
  await exited;
  for (const t of timers) clearTimeout(t);
}

/** Waits for a process that is not our child (a worker whose master is gone) to exit, killing it after `graceMs`. */
async function stopOrphan(pid: number, graceMs = 2000): Promise<void> {
  const deadline = Date.now() + graceMs;
  while (await running(pid)) {
    if (Date.now() >= deadline) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        return; // gone meanwhile
      }
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** `show stat` CSV (a `# ` header line, then one line per proxy or server) as rows keyed by column name. */
export function parseStatCsv(csv: string): Record<string, string>[] {
  const lines = csv.split('\n').filter((l) => l.trim() !== '');
  const head = lines[0];
  if (!head?.startsWith('# ')) throw new TarmacError('unavailable', `haproxy show stat: unexpected answer: ${csv.slice(0, 200)}`);
  const columns = csvFields(head.slice(2));
  return lines.slice(1).map((line) => {
    const values = csvFields(line);
    const row: Record<string, string> = {};
    columns.forEach((c, i) => { if (c !== '') row[c] = values[i] ?? ''; });
    return row;
  });
}

/** The fields of one CSV line (quoted fields may hold commas, `""` is a quote). */
function csvFields(line: string): string[] {
  const out: string[] = [];
  let i = 0;
  for (;;) {
    let field = '';
    if (line[i] === '"') {
      i++;
      for (; i < line.length; i++) {
        if (line[i] === '"' && line[i + 1] === '"') field += line[i++];
        else if (line[i] === '"') break;
        else field += line[i];
      }
      i++;
    }
    const comma = line.indexOf(',', i);
    field += line.slice(i, comma === -1 ? undefined : comma);
    out.push(field);
    if (comma === -1) return out;
    i = comma + 1;
  }
}
