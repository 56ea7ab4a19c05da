// The worker's orchestrator: reconciles the machines placed on this host with their desired state, durably.
import { mkdir, rm, readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { Catalog, MachineEvent, MachineSpec, MachineStatus, ExitEvent } from '../catalog/index.ts';
import { durationMs } from '../catalog/index.ts';
import { newUlid } from '../shared/ids.ts';
import { TarmacError, errorMessage, isTarmacError } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';
import type { Driver, ExitStatus, RunningMachine, RunSpec } from './driver.ts';
import type { ImageStore, PulledImage } from './images/index.ts';
import { LocalState, type InstanceRow, type Step } from './local-state.ts';
import { setupMachineNetwork, teardownMachineNetwork, listMachineNetworks, netnsName } from './network.ts';
import { MachineChecks, sameCheckStatuses } from './checks.ts';

/** What the orchestrator needs from the image store. */
export type ImagePuller = Pick<ImageStore, 'pull'>;

export interface OrchestratorOptions {
  catalog: Catalog;
  hostId: string;
  region: string;
  /** Host data dir: machines/<id>/ holds each machine's logs and instance state. */
  dataDir: string;
  drivers: Record<string, Driver>;
  defaultDriver: string;
  images: ImagePuller;
  log: Logger;
  /** Fly's default grace before SIGKILL when a machine's stop_config has none. */
  defaultStopTimeoutMs?: number;
}

/** Metadata key that picks a machine's driver (e.g. "runsc" for gVisor); the host default otherwise. */
export const runtimeMetadataKey = 'tarmac_runtime';

const defaultMaxRetries = 10;
/** A catalog status write is retried this many times (short backoff) before a reconcile is scheduled retryLaterMs later, as after a failed task. */
const statusWriteAttempts = 4;
const retryLaterMs = 5000;

export class Orchestrator {
  readonly #o: OrchestratorOptions;
  readonly #local: LocalState;
  readonly #running = new Map<string, { instanceId: string; machine: RunningMachine }>();
  readonly #queues = new Map<string, Promise<void>>();
  readonly #dirty = new Set<string>();
  /** Timers that schedule a reconcile later (a restart backoff ending, a status write to retry). */
  readonly #timers = new Map<string, NodeJS.Timeout>();
  /** Instances in a graceful stop: a destroy that arrives meanwhile kills them at once instead of waiting out the grace. */
  readonly #stopping = new Map<string, RunningMachine>();
  /** Health checks of running instances that have any; their results go into the machine's status. */
  readonly #checks = new Map<string, MachineChecks>();
  readonly #log: Logger;
  #unsubscribe: (() => void) | undefined;
  #closed = false;

  constructor(opts: OrchestratorOptions) {
    this.#o = opts;
    this.#log = opts.log;
    this.#local = new LocalState(join(opts.dataDir, 'orchestrator.sqlite'));
  }

  /** Recovers instances left by a previous run of this host, then reconciles every machine placed here. */
  async start(): Promise<void> {
    await mkdir(join(this.#o.dataDir, 'machines'), { recursive: true });
    this.#unsubscribe = this.#o.catalog.subscribe((batch) => {
      for (const ch of batch.changes) {
        if (ch.kind !== 'machine_spec') continue;
        this.#interruptStop(ch.key);
        this.#schedule(ch.key);
      }
    });
    await Promise.all(this.#local.all().map((row) => this.#enqueue(row.machine_id, () => this.#recover(row))));
    await this.#sweepOrphans();
    for (const m of this.#o.catalog.listMachines({ host_id: this.#o.hostId, include_deleted: true })) this.#schedule(m.spec.id);
    for (const row of this.#local.all()) this.#schedule(row.machine_id); // instances whose machine left the catalog meanwhile
  }

  /** Stops reconciling. Machines keep running: their monitors outlive the host, and the next start reattaches. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#unsubscribe?.();
    for (const t of this.#timers.values()) clearTimeout(t);
    this.#timers.clear();
    for (const c of this.#checks.values()) c.stop();
    this.#checks.clear();
    await Promise.allSettled([...this.#queues.values()]);
    for (const d of Object.values(this.#o.drivers)) d.release(); // machines keep running; stop watching them
    this.#local.close();
  }

  /** Resolves when every queued reconcile has finished (for tests and shutdown). */
  async idle(): Promise<void> {
    while (this.#queues.size > 0) await Promise.allSettled([...this.#queues.values()]);
  }

  logPath(machineId: string): string {
    return join(this.#o.dataDir, 'machines', machineId, 'logs', 'console.log');
  }

  /** Sends a signal to a running machine of this host. */
  async signal(machineId: string, signal: string): Promise<void> {
    const r = this.#running.get(machineId);
    if (!r) throw new TarmacError('failed_precondition', `machine ${machineId} is not running`);
    await r.machine.kill(signal);
  }

  // ---- scheduling: one task at a time per machine, reconciles coalesced ----

  #schedule(id: string): void {
    if (this.#closed) return;
    if (this.#dirty.has(id)) return;
    this.#dirty.add(id);
    void this.#enqueue(id, async () => {
      this.#dirty.delete(id);
      await this.#reconcile(id);
    });
  }

  /** Schedules a reconcile of `id` at `at` (epoch ms); an earlier spec change reconciles sooner anyway. */
  #wakeAt(id: string, at: number): void {
    if (this.#closed) return;
    clearTimeout(this.#timers.get(id));
    const timer = setTimeout(() => {
      if (this.#timers.get(id) === timer) this.#timers.delete(id);
      this.#schedule(id);
    }, Math.max(0, at - Date.now()));
    timer.unref();
    this.#timers.set(id, timer);
  }

  /** A destroy (or removal from the catalog) during a graceful stop does not wait for the grace to run out. */
  #interruptStop(id: string): void {
    const machine = this.#stopping.get(id);
    if (!machine) return;
    const m = this.#o.catalog.getMachine(id);
    if (m && m.spec.desired !== 'destroyed') return;
    this.#log.info({ machine: id }, 'destroy requested during a stop: killing now');
    void machine.kill('SIGKILL').catch((e: unknown) => this.#log.warn({ err: e, machine: id }, 'kill failed'));
  }

  #enqueue(id: string, task: () => Promise<void>): Promise<void> {
    const prev = this.#queues.get(id) ?? Promise.resolve();
    const next = prev.then(task).catch((e: unknown) => {
      // The durable row says where it stopped; a later reconcile picks it up from there.
      this.#log.error({ err: e, machine: id }, 'machine task failed; reconciling again in a few seconds');
      this.#wakeAt(id, Date.now() + retryLaterMs);
    });
    this.#queues.set(id, next);
    void next.then(() => {
      if (this.#queues.get(id) === next) this.#queues.delete(id);
    });
    return next;
  }

  // ---- reconcile ----

  async #reconcile(id: string): Promise<void> {
    if (this.#closed) return;
    const m = this.#o.catalog.getMachine(id);
    const spec = m && m.spec.host_id === this.#o.hostId ? m.spec : undefined;
    let row = this.#local.get(id);

    // A destroyed machine (by request, or auto_destroy after its exit) never comes back.
    if (!spec || spec.desired === 'destroyed' || m?.status?.state === 'destroyed') {
      if (row) await this.#removeInstance(row, spec, true);
      else if (spec && m?.status?.state !== 'destroyed') await this.#removeLeftovers(id); // e.g. a start rolled back after a crash
      if (spec && m?.status?.state !== 'destroyed') {
        await rm(join(this.#o.dataDir, 'machines', id), { recursive: true, force: true });
        await this.#setStatus(spec, 'destroyed', [this.#event(id, 'destroy', 'destroyed', 'user')]);
      }
      return;
    }
    const running = this.#running.get(id);
    if (row && row.instance_id !== spec.instance_id) {
      // An update: the old instance goes, the new one starts below if wanted.
      if (running) await this.#stopInstance(row, spec, 'replacing');
      await this.#removeInstance(row, spec, false);
      row = undefined;
    }
    if (spec.desired === 'stopped') {
      // A stop left half-done (its cleanup failed) is finished too.
      if (row && (this.#running.has(id) || row.step === 'stopping')) await this.#stopInstance(row, spec, 'stopping');
      else {
        if (row?.restart_at) this.#local.record({ ...row, restart_at: 0 }, 'policy restart cancelled by a stop');
        if (m?.status?.state !== 'stopped' || m.status.instance_id !== spec.instance_id) await this.#setStatus(spec, 'stopped');
      }
      return;
    }
    // desired: started
    if (row && this.#running.has(id)) {
      if (row.generation === spec.restart_generation && row.step === 'running') {
        if (m?.status?.state !== 'started') await this.#setStatus(spec, 'started');
        return;
      }
      row = await this.#stopInstance(row, spec, 'stopping'); // a restart request (or a stop the host was interrupted in)
    }
    if (row && row.step === 'exited' && row.generation === spec.restart_generation) {
      if (row.restart_at > 0) {
        // A restart by policy after a backoff; any spec change before then reconciles at once instead.
        if (Date.now() < row.restart_at) return this.#wakeAt(id, row.restart_at);
        await this.#startInstance(spec, row.restarts);
        return;
      }
      // Exited by itself (or failed to start): waits for a start request. Settle a status a failed write left behind.
      const state = m?.status?.state;
      if (state === 'starting' || state === 'started' || state === 'stopping') await this.#setStatus(spec, 'stopped');
      return;
    }
    await this.#startInstance(spec, row ? row.restarts : 0);
  }

  /** Removes what an instance without a row may have left (driver state, network): after a rolled-back start, or lost local state. */
  async #removeLeftovers(id: string, network = true): Promise<void> {
    const stateDir = join(this.#o.dataDir, 'machines', id, 'instance');
    const driverName = await readFile(join(stateDir, 'driver.json'), 'utf8').then(
      (t) => (JSON.parse(t) as { driver?: string }).driver,
      () => undefined,
    );
    const driver = this.#o.drivers[driverName ?? this.#o.defaultDriver] ?? this.#o.drivers[this.#o.defaultDriver];
    await driver?.remove(id, stateDir);
    if (network) await teardownMachineNetwork(id);
  }

  /**
   * At start, after recovery: removes what no instance of this host accounts for. Driver state under this host's data
   * dir without an instance row, and network namespaces of machines this host ran (its step history or catalog
   * placement) that have no instance row and are no longer wanted. Namespaces of machines this host never knew are
   * left alone: another host may share the machine.
   */
  async #sweepOrphans(): Promise<void> {
    const rows = new Set(this.#local.all().map((r) => r.machine_id));
    const placed = new Map(this.#o.catalog.listMachines({ host_id: this.#o.hostId, include_deleted: true }).map((m) => [m.spec.id, m]));
    const known = new Set([...this.#local.knownMachines(), ...placed.keys()]);
    const unwanted = (id: string) => {
      const m = placed.get(id);
      return !m || m.spec.desired === 'destroyed' || m.status?.state === 'destroyed';
    };
    const tasks: Array<Promise<void>> = [];
    const dirs = await readdir(join(this.#o.dataDir, 'machines')).catch(() => [] as string[]);
    for (const id of dirs) {
      if (rows.has(id) || !/^[0-9a-z]+$/.test(id)) continue;
      const stateDir = join(this.#o.dataDir, 'machines', id, 'instance');
      if (!(await readdir(stateDir).then(() => true, () => false))) continue;
      this.#log.warn({ machine: id }, 'removing an orphaned instance (no local state records it)');
      tasks.push(this.#enqueue(id, () => this.#removeLeftovers(id, unwanted(id))));
    }
    const stems = new Set(await listMachineNetworks());
    for (const id of known) {
      if (rows.has(id) || !unwanted(id) || !stems.has(netnsName(id).slice('tm-'.length))) continue;
      this.#log.warn({ machine: id, netns: netnsName(id) }, 'removing an orphaned machine network');
      tasks.push(this.#enqueue(id, () => teardownMachineNetwork(id)));
    }
    await Promise.all(tasks);
  }

  async #startInstance(spec: MachineSpec, restarts: number): Promise<void> {
    const id = spec.id;
    const driverName = spec.config.metadata?.[runtimeMetadataKey] ?? this.#o.defaultDriver;
    const driver = this.#o.drivers[driverName];
    const base: InstanceRow = {
      machine_id: id, instance_id: spec.instance_id, driver: driverName, state_dir: join(this.#o.dataDir, 'machines', id, 'instance'),
      step: 'pulling', restarts, generation: spec.restart_generation, stop_requested: 0, stop_deadline: 0, restart_at: 0, updated_at: '',
    };
    clearTimeout(this.#timers.get(id));
    this.#timers.delete(id);
    let row = this.#local.record(base);
    const step = (s: Step, detail?: string) => (row = this.#local.record({ ...row, step: s }, detail));
    try {
      if (!driver) throw new TarmacError('invalid_argument', `runtime "${driverName}" is not available on this host (have: ${Object.keys(this.#o.drivers).join(', ')})`);
      await this.#setStatus(spec, 'starting', [this.#event(id, 'start', 'starting', 'flyd')]);
      const t0 = Date.now();
      const image = await this.#pullWithProgress(spec);
      const pulledMs = Date.now() - t0;
      step('preparing');
      const net = await setupMachineNetwork(id, spec.private_ip, { log: this.#log });
      await mkdir(join(this.#o.dataDir, 'machines', id, 'logs'), { recursive: true });
      step('starting');
      const machine = await driver.start(this.#runSpec(spec, image, net.netnsPath, row.state_dir));
      step('running');
      this.#attach(id, spec.instance_id, machine);
      await this.#setStatus(spec, 'started', [this.#event(id, 'start', 'started', 'flyd', { pull_ms: pulledMs })], { image_ref: image.ref, restarts });
      this.#log.info({ machine: id, instance: spec.instance_id, driver: driverName, ms: Date.now() - t0 }, 'machine started');
    } catch (e) {
      this.#log.warn({ machine: id, err: isTarmacError(e) ? errorMessage(e) : e }, 'machine failed to start');
      await driver?.remove(id, row.state_dir).catch(() => {});
      step('exited', errorMessage(e));
      await this.#setStatus(spec, 'failed', [this.#event(id, 'failed', 'failed', 'flyd', { error: errorMessage(e) })]);
    }
  }

  /**
   * Pulls the machine's image. While layers download, `pull` events carry the progress (at most a few a
   * second), so `tarmac machine run` can show it; a cached image records no pull events.
   */
  async #pullWithProgress(spec: MachineSpec): Promise<PulledImage> {
    const layers = new Map<string, { bytes: number; total: number }>();
    let downloading = false;
    let lastWrite = 0;
    let writes = Promise.resolve();
    const record = (status: string, request: Record<string, unknown>) => {
      writes = writes.then(() => this.#o.catalog.appendEvents([this.#event(spec.id, 'pull', status, 'flyd', request)])).catch(() => {});
    };
    const totals = () => {
      let bytes = 0, total = 0;
      for (const l of layers.values()) { bytes += l.bytes; total += l.total; }
      return { image: spec.config.image, layers: layers.size, bytes, total };
    };
    // An instance runs the image it was first started with: pin it by digest, which needs no registry request.
    const prev = this.#o.catalog.getMachine(spec.id)?.status;
    const pinned = prev?.instance_id === spec.instance_id ? prev.image_ref : undefined;
    const reference = pinned ? `${pinned.registry}/${pinned.repository}@${pinned.digest}` : spec.config.image;
    const image = await this.#o.images.pull(reference, {
      onProgress: (p) => {
        if (p.phase !== 'downloading' || !p.layer) return;
        if (!downloading) {
          downloading = true;
          record('pulling', { image: spec.config.image });
        }
        layers.set(p.layer, { bytes: p.bytes ?? 0, total: p.total ?? 0 });
        const now = Date.now();
        if (now - lastWrite >= 250) {
          lastWrite = now;
          record('pulling', totals());
        }
      },
    });
    if (downloading) record('pulled', { ...totals(), digest: image.ref.digest });
    await writes;
    return pinned ? { ...image, ref: pinned } : image;
  }

  #runSpec(spec: MachineSpec, image: PulledImage, netnsPath: string, stateDir: string): RunSpec {
    const cfg = spec.config;
    const init = cfg.init ?? {};
    const entrypoint = init.entrypoint ?? image.config.Entrypoint ?? [];
    const cmd = init.cmd ?? (init.entrypoint ? [] : image.config.Cmd ?? []);
    const args = init.exec ?? [...entrypoint, ...cmd];
    if (args.length === 0) args.push('/bin/sh');
    const env: Record<string, string> = { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' };
    for (const kv of image.config.Env ?? []) {
      const eq = kv.indexOf('=');
      if (eq > 0) env[kv.slice(0, eq)] = kv.slice(eq + 1);
    }
    Object.assign(env, cfg.env ?? {});
    const imageRef = `${image.ref.registry}/${image.ref.repository}:${image.ref.tag}`;
    const identity: Record<string, string> = {
      APP_NAME: spec.app, MACHINE_ID: spec.id, ALLOC_ID: spec.id, REGION: spec.region, PRIVATE_IP: spec.private_ip,
      IMAGE_REF: imageRef, MACHINE_VERSION: spec.instance_id, PROCESS_GROUP: cfg.metadata?.['fly_process_group'] ?? 'app',
    };
    for (const [k, v] of Object.entries(identity)) {
      env[`FLY_${k}`] = v;
      env[`TARMAC_${k}`] = v;
    }
    const guest = cfg.guest ?? {};
    return {
      id: spec.id, instanceId: spec.instance_id, imageRootfs: image.rootfs, stateDir, args, env,
      cwd: image.config.WorkingDir || '/', user: image.config.User ?? '', hostname: spec.id, netnsPath,
      hosts: `127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n${spec.private_ip}\t${spec.id} ${spec.id}.vm.${spec.app}.internal\n`,
      limits: { cpus: guest.cpus ?? 1, memoryMb: guest.memory_mb ?? 256, pids: 4096 },
      logPath: this.logPath(spec.id),
    };
  }

  /** Watches an instance's exit; a crash is handled on the machine's queue. */
  #attach(id: string, instanceId: string, machine: RunningMachine): void {
    this.#running.set(id, { instanceId, machine });
    this.#startChecks(id, instanceId);
    void machine.exited.then((exit) => {
      if (this.#running.get(id)?.machine === machine) this.#running.delete(id);
      this.#stopChecks(id, instanceId);
      if (this.#closed) return;
      void this.#enqueue(id, () => this.#onExit(id, instanceId, exit));
    });
  }

  /** An exit nobody asked for: record it, then restart by policy or settle as stopped (or destroyed). */
  async #onExit(id: string, instanceId: string, exit: ExitStatus, detail?: string): Promise<void> {
    const row = this.#local.get(id);
    if (!row || row.instance_id !== instanceId || row.stop_requested || row.step !== 'running') return;
    if (detail) this.#log.info({ machine: id, code: exit.code }, detail);
    const spec = this.#o.catalog.getMachine(id)?.spec;
    const policy = spec?.config.restart?.policy ?? 'on-failure';
    const maxRetries = spec?.config.restart?.max_retries ?? defaultMaxRetries;
    const wanted = spec && spec.desired === 'started' && spec.instance_id === instanceId;
    const restart = !!wanted && (policy === 'always' || (policy === 'on-failure' && exit.code !== 0 && row.restarts < maxRetries));
    const exitEvent: ExitEvent = {
      exit_code: exit.code, oom_killed: exit.oomKilled, requested_stop: false, restarting: restart, signal: exit.signal,
      exited_at: exit.exitedAt.toISOString(),
    };
    this.#log.info({ machine: id, code: exit.code, oom: exit.oomKilled, restart }, 'machine exited');
    const driver = this.#o.drivers[row.driver];
    await driver?.remove(id, row.state_dir).catch((e: unknown) => this.#log.warn({ err: e, machine: id }, 'instance cleanup failed'));
    // The backoff is a time in the row, not a wait on this queue: a stop or destroy meanwhile is handled at once,
    // and a host that restarts during it still restarts the machine.
    const restartAt = restart ? Date.now() + Math.min(100 * 2 ** row.restarts, 10_000) : 0;
    this.#local.record(
      { ...row, step: 'exited', restarts: restart ? row.restarts + 1 : row.restarts, restart_at: restartAt },
      `exit ${exit.code}${exit.oomKilled ? ' oom' : ''}${restart ? ' (restarting)' : ''}`,
    );
    if (!spec) return;
    const events = [this.#event(id, 'exit', 'stopped', 'flyd', { exit_event: exitEvent })];
    if (restart) {
      await this.#setStatus(spec, 'stopped', events, { last_exit: exitEvent, restarts: row.restarts + 1 });
      this.#wakeAt(id, restartAt);
      return;
    }
    await this.#setStatus(spec, 'stopped', events, { last_exit: exitEvent });
    if (spec.config.auto_destroy) {
      await this.#removeInstance(this.#local.get(id) ?? row, spec, true);
      await this.#setStatus(spec, 'destroyed', [this.#event(id, 'destroy', 'destroyed', 'flyd')]);
    }
  }

  /** Stops a running instance as asked (stop_config or the /stop request), then removes its runtime state. */
  async #stopInstance(row: InstanceRow, spec: MachineSpec, state: 'stopping' | 'replacing'): Promise<InstanceRow> {
    const running = this.#running.get(row.machine_id);
    this.#stopChecks(row.machine_id);
    const signal = spec.stop?.signal ?? spec.config.stop_config?.signal ?? 'SIGINT';
    const timeoutMs = spec.stop?.timeout_ms ?? (spec.config.stop_config?.timeout !== undefined ? durationMs(spec.config.stop_config.timeout) : this.#o.defaultStopTimeoutMs ?? 5000);
    // A stop the host was interrupted in keeps its deadline: the grace is not granted twice.
    const resumed = row.step === 'stopping' && row.stop_deadline > 0;
    const deadline = resumed ? row.stop_deadline : Date.now() + timeoutMs;
    row = this.#local.record({ ...row, step: 'stopping', stop_requested: 1, stop_deadline: deadline, restart_at: 0 }, resumed ? 'stop resumed' : undefined);
    const prev = this.#o.catalog.getMachine(spec.id)?.status;
    if (!resumed || prev?.state !== state) await this.#setStatus(spec, state, [this.#event(spec.id, 'stop', state, 'user')]);
    let exit: ExitStatus | undefined;
    if (running) {
      this.#stopping.set(row.machine_id, running.machine);
      this.#interruptStop(row.machine_id); // a destroy that came in since this reconcile read the spec
      try {
        exit = await running.machine.stop(signal, Math.max(0, deadline - Date.now()));
      } finally {
        this.#stopping.delete(row.machine_id);
      }
      this.#running.delete(row.machine_id);
    }
    await this.#o.drivers[row.driver]?.remove(row.machine_id, row.state_dir);
    row = this.#local.record({ ...row, step: 'exited', stop_requested: 0, stop_deadline: 0 }, 'stopped on request');
    if (state === 'stopping') {
      const exitEvent: ExitEvent | undefined = exit && {
        exit_code: exit.code, oom_killed: exit.oomKilled, requested_stop: true, restarting: false, signal: exit.signal, exited_at: exit.exitedAt.toISOString(),
      };
      await this.#setStatus(spec, 'stopped', [this.#event(spec.id, 'exit', 'stopped', 'flyd', exitEvent ? { exit_event: exitEvent } : undefined)], exitEvent ? { last_exit: exitEvent } : {});
    }
    return row;
  }

  /** Removes an instance (stopping it first with SIGKILL semantics when it runs); `destroy` also drops its network. */
  async #removeInstance(row: InstanceRow, spec: MachineSpec | undefined, destroy: boolean): Promise<void> {
    const running = this.#running.get(row.machine_id);
    this.#stopChecks(row.machine_id);
    row = this.#local.record({ ...row, step: 'removing', stop_requested: 1 });
    if (running) {
      if (spec && destroy) await this.#setStatus(spec, 'destroying', [this.#event(spec.id, 'destroy', 'destroying', 'user')]);
      const signal = spec?.config.stop_config?.signal ?? 'SIGINT';
      this.#stopping.set(row.machine_id, running.machine);
      try {
        await running.machine.stop(signal, spec ? Math.min(this.#o.defaultStopTimeoutMs ?? 5000, 5000) : 0);
      } finally {
        this.#stopping.delete(row.machine_id);
      }
      this.#running.delete(row.machine_id);
    }
    await this.#o.drivers[row.driver]?.remove(row.machine_id, row.state_dir);
    if (destroy) {
      await teardownMachineNetwork(row.machine_id);
      this.#local.record({ ...row, step: 'removed' });
      this.#local.remove(row.machine_id);
      if (!spec) await rm(join(this.#o.dataDir, 'machines', row.machine_id), { recursive: true, force: true });
    }
  }

  /**
   * After a host restart, per instance row: reattach to what still runs, settle what ended while the host was down,
   * roll back half-done starts. What is still wanted then happens in the reconcile that follows.
   */
  async #recover(row: InstanceRow): Promise<void> {
    const id = row.machine_id;
    const driver = this.#o.drivers[row.driver];
    if (!driver) {
      this.#log.error({ machine: id, driver: row.driver }, 'instance of a driver this host no longer has: left as it is');
      return;
    }
    switch (row.step) {
      case 'running':
      case 'stopping': {
        const found = await driver.recover(id, row.state_dir);
        if (found && 'pid' in found) {
          this.#log.info({ machine: id, pid: found.pid, step: row.step }, 'reattached to running machine');
          // A stop in progress stays one (stop_requested): the reconcile finishes it with the deadline it had.
          this.#attach(id, row.instance_id, found);
          return;
        }
        const exit = found?.exited ?? { code: 255, signal: 0, oomKilled: false, exitedAt: new Date() };
        if (row.step === 'running') {
          await this.#onExit(id, row.instance_id, exit, 'ended while the host was down');
          return;
        }
        // It exited while we were stopping it: the stop is done.
        await driver.remove(id, row.state_dir);
        this.#local.record({ ...row, step: 'exited', stop_requested: 0, stop_deadline: 0 }, 'stopped while the host was down');
        const spec = this.#o.catalog.getMachine(id)?.spec;
        if (spec && spec.desired === 'stopped' && spec.instance_id === row.instance_id) {
          const exitEvent: ExitEvent = {
            exit_code: exit.code, oom_killed: exit.oomKilled, requested_stop: true, restarting: false, signal: exit.signal, exited_at: exit.exitedAt.toISOString(),
          };
          await this.#setStatus(spec, 'stopped', [this.#event(id, 'exit', 'stopped', 'flyd', { exit_event: exitEvent })], { last_exit: exitEvent });
        }
        return;
      }
      case 'pulling':
      case 'preparing':
      case 'starting':
        // Interrupted mid-start: roll back to nothing (the driver removes a container even if it already runs); the
        // reconcile that follows starts it again if it is still wanted, or removes its network if not.
        await driver.remove(id, row.state_dir);
        this.#local.record({ ...row, step: 'removed' }, `rolled back from ${row.step}`);
        this.#local.remove(id);
        return;
      case 'removing':
        // Interrupted mid-removal: it was going anyway, so no grace; the reconcile finishes the destroy (network and
        // all) or the replacement, since the row still says what was under way.
        await driver.remove(id, row.state_dir);
        return;
      case 'exited':
      case 'removed':
        return;
    }
  }

  // ---- health checks (results are observed state, written only when one changes) ----

  /** Starts the checks of an instance that just started (or was reattached), if its config has any. */
  #startChecks(id: string, instanceId: string): void {
    this.#stopChecks(id);
    const spec = this.#o.catalog.getMachine(id)?.spec;
    if (!spec || spec.instance_id !== instanceId) return; // replaced meanwhile: the reconcile that follows handles it
    const checks = new MachineChecks(spec, () => this.#checksChanged(id, checks));
    if (checks.empty) return;
    this.#checks.set(id, checks);
  }

  #stopChecks(id: string, instanceId?: string): void {
    const checks = this.#checks.get(id);
    if (!checks || (instanceId !== undefined && checks.instanceId !== instanceId)) return;
    checks.stop();
    this.#checks.delete(id);
  }

  /** A check changed status: write the results on the machine's queue, after whatever it is doing, if still current. */
  #checksChanged(id: string, checks: MachineChecks): void {
    void this.#enqueue(id, async () => {
      if (this.#closed || this.#checks.get(id) !== checks) return;
      const m = this.#o.catalog.getMachine(id);
      // Only a started instance's status carries checks; the next state write includes the latest results anyway.
      if (!m?.status || m.status.state !== 'started' || m.status.instance_id !== checks.instanceId || m.spec.instance_id !== checks.instanceId) return;
      if (sameCheckStatuses(m.status.checks, checks.results())) return;
      await this.#setStatus(m.spec, 'started');
    });
  }

  // ---- catalog writes (observed state only) ----

  async #setStatus(spec: MachineSpec, state: MachineStatus['state'], events: MachineEvent[] = [], extra: Partial<MachineStatus> = {}): Promise<void> {
    const prev = this.#o.catalog.getMachine(spec.id)?.status;
    const status: MachineStatus = {
      id: spec.id, app: spec.app, state, instance_id: spec.instance_id,
      restarts: prev?.instance_id === spec.instance_id ? prev.restarts : 0, restart_generation: spec.restart_generation,
      updated_at: new Date().toISOString(),
      ...(prev?.image_ref ? { image_ref: prev.image_ref } : {}),
      ...(prev?.last_exit ? { last_exit: prev.last_exit } : {}),
      ...extra,
    };
    const checks = this.#checks.get(spec.id);
    if (state === 'started' && checks?.instanceId === spec.instance_id) status.checks = checks.results();
    // Observed state must reach the catalog eventually: retry a failed write a few times, then have the reconcile
    // (which compares the instance with the catalog status) try again later. The local state stays the truth.
    for (let attempt = 1; ; attempt++) {
      try {
        await this.#o.catalog.putMachineStatus(status, events);
        return;
      } catch (e) {
        if (attempt >= statusWriteAttempts || this.#closed) {
          this.#log.error({ err: e, machine: spec.id, state }, 'could not write the machine status to the catalog; retrying later');
          this.#wakeAt(spec.id, Date.now() + retryLaterMs);
          return;
        }
        await delay(50 * 4 ** attempt);
      }
    }
  }

  #event(machineId: string, type: MachineEvent['type'], status: string, source: MachineEvent['source'], request?: Record<string, unknown>): MachineEvent {
    return { id: newUlid(), machine_id: machineId, type, status, source, timestamp: Date.now(), ...(request ? { request } : {}) };
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms).unref());
}
