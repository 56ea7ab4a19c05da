// The worker's orchestrator: reconciles the machines placed on this host with their desired state, durably.
import { mkdir, rm, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Catalog, MachineEvent, MachineSpec, MachineStatus, ImageRef, ExitEvent } from '../catalog/index.ts';
import { durationMs } from '../catalog/index.ts';
import { newUlid } from '../shared/ids.ts';
import { TarmacError, errorMessage, isTarmacError } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';
import type { Driver, ExitStatus, ImageConfig, RunningMachine, RunSpec } from './driver.ts';
import { LocalState, type InstanceRow, type Step } from './local-state.ts';
import { setupMachineNetwork, teardownMachineNetwork } from './network.ts';

/** What the orchestrator needs from the image store. */
export interface ImagePuller {
  pull(reference: string, opts?: { onProgress?: (p: { phase: string; bytes?: number; total?: number; layer?: string }) => void; signal?: AbortSignal }):
    Promise<{ ref: ImageRef; rootfs: string; config: ImageConfig }>;
}

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

export class Orchestrator {
  readonly #o: OrchestratorOptions;
  readonly #local: LocalState;
  readonly #running = new Map<string, { instanceId: string; machine: RunningMachine }>();
  readonly #queues = new Map<string, Promise<void>>();
  readonly #dirty = new Set<string>();
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
      for (const ch of batch.changes) if (ch.kind === 'machine_spec') this.#schedule(ch.key);
    });
    await Promise.all(this.#local.all().map((row) => this.#enqueue(row.machine_id, () => this.#recover(row))));
    for (const m of this.#o.catalog.listMachines({ host_id: this.#o.hostId, include_deleted: true })) this.#schedule(m.spec.id);
    for (const row of this.#local.all()) this.#schedule(row.machine_id); // instances whose machine left the catalog meanwhile
  }

  /** Stops reconciling. Machines keep running: their monitors outlive the host, and the next start reattaches. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#unsubscribe?.();
    await Promise.allSettled([...this.#queues.values()]);
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

  #enqueue(id: string, task: () => Promise<void>): Promise<void> {
    const prev = this.#queues.get(id) ?? Promise.resolve();
    const next = prev.then(task).catch((e: unknown) => {
      this.#log.error({ err: e, machine: id }, 'machine task failed');
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

    if (!spec || spec.desired === 'destroyed') {
      if (row) await this.#removeInstance(row, spec, true);
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
      if (row && this.#running.has(id)) await this.#stopInstance(row, spec, 'stopping');
      else if (m?.status?.state !== 'stopped' || m.status.instance_id !== spec.instance_id) await this.#setStatus(spec, 'stopped');
      return;
    }
    // desired: started
    if (row && this.#running.has(id)) {
      if (row.generation === spec.restart_generation) {
        if (m?.status?.state !== 'started') await this.#setStatus(spec, 'started');
        return;
      }
      row = await this.#stopInstance(row, spec, 'stopping'); // a restart request
    }
    if (row && row.step === 'exited' && row.generation === spec.restart_generation) return; // exited by itself; waits for a start
    await this.#startInstance(spec, row ? row.restarts : 0);
  }

  async #startInstance(spec: MachineSpec, restarts: number): Promise<void> {
    const id = spec.id;
    const driverName = spec.config.metadata?.[runtimeMetadataKey] ?? this.#o.defaultDriver;
    const driver = this.#o.drivers[driverName];
    const base: InstanceRow = {
      machine_id: id, instance_id: spec.instance_id, driver: driverName, state_dir: join(this.#o.dataDir, 'machines', id, 'instance'),
      step: 'pulling', restarts, generation: spec.restart_generation, stop_requested: 0, updated_at: '',
    };
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
  async #pullWithProgress(spec: MachineSpec): Promise<{ ref: ImageRef; rootfs: string; config: ImageConfig }> {
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

  #runSpec(spec: MachineSpec, image: { ref: ImageRef; rootfs: string; config: ImageConfig }, netnsPath: string, stateDir: string): RunSpec {
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
      resolvConf: hostResolvConf, hosts: `127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n${spec.private_ip}\t${spec.id} ${spec.id}.vm.${spec.app}.internal\n`,
      limits: { cpus: guest.cpus ?? 1, memoryMb: guest.memory_mb ?? 256, pids: 4096 },
      logPath: this.logPath(spec.id),
    };
  }

  /** Watches an instance's exit; a crash is handled on the machine's queue. */
  #attach(id: string, instanceId: string, machine: RunningMachine): void {
    this.#running.set(id, { instanceId, machine });
    void machine.exited.then((exit) => {
      if (this.#running.get(id)?.machine === machine) this.#running.delete(id);
      if (this.#closed) return;
      void this.#enqueue(id, () => this.#onExit(id, instanceId, exit));
    });
  }

  /** An exit nobody asked for: record it, then restart by policy or settle as stopped (or destroyed). */
  async #onExit(id: string, instanceId: string, exit: ExitStatus): Promise<void> {
    const row = this.#local.get(id);
    if (!row || row.instance_id !== instanceId || row.stop_requested || row.step !== 'running') return;
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
    this.#local.record({ ...row, step: 'exited' }, `exit ${exit.code}${exit.oomKilled ? ' oom' : ''}`);
    if (!spec) return;
    const events = [this.#event(id, 'exit', 'stopped', 'flyd', { exit_event: exitEvent })];
    if (restart) {
      await this.#setStatus(spec, 'stopped', events, { last_exit: exitEvent, restarts: row.restarts + 1 });
      await delay(Math.min(100 * 2 ** row.restarts, 10_000));
      if (!this.#closed) await this.#startInstance(spec, row.restarts + 1);
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
    row = this.#local.record({ ...row, step: 'stopping', stop_requested: 1 });
    await this.#setStatus(spec, state, [this.#event(spec.id, 'stop', state, 'user')]);
    const signal = spec.stop?.signal ?? spec.config.stop_config?.signal ?? 'SIGINT';
    const timeoutMs = spec.stop?.timeout_ms ?? (spec.config.stop_config?.timeout !== undefined ? durationMs(spec.config.stop_config.timeout) : this.#o.defaultStopTimeoutMs ?? 5000);
    let exit: ExitStatus | undefined;
    if (running) {
      exit = await running.machine.stop(signal, timeoutMs);
      this.#running.delete(row.machine_id);
    }
    await this.#o.drivers[row.driver]?.remove(row.machine_id, row.state_dir);
    row = this.#local.record({ ...row, step: 'exited', stop_requested: 0 }, 'stopped on request');
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
    row = this.#local.record({ ...row, step: 'removing', stop_requested: 1 });
    if (running) {
      if (spec && destroy) await this.#setStatus(spec, 'destroying', [this.#event(spec.id, 'destroy', 'destroying', 'user')]);
      const signal = spec?.config.stop_config?.signal ?? 'SIGINT';
      await running.machine.stop(signal, spec ? Math.min(this.#o.defaultStopTimeoutMs ?? 5000, 5000) : 0);
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

  /** After a host restart: reattach to what still runs, settle what ended, roll back half-done starts. */
  async #recover(row: InstanceRow): Promise<void> {
    const driver = this.#o.drivers[row.driver];
    if (!driver) return;
    if (row.step === 'running' || row.step === 'stopping') {
      const found = await driver.recover(row.machine_id, row.state_dir);
      if (found && 'pid' in found) {
        this.#log.info({ machine: row.machine_id, pid: found.pid }, 'reattached to running machine');
        this.#attach(row.machine_id, row.instance_id, found);
        if (row.step === 'stopping') this.#local.record({ ...row, step: 'running', stop_requested: 0 });
        return;
      }
      const exit = found?.exited ?? { code: 255, signal: 0, oomKilled: false, exitedAt: new Date() };
      this.#local.record({ ...row, step: 'running', stop_requested: 0 }, 'ended while the host was down');
      await this.#onExit(row.machine_id, row.instance_id, exit);
      return;
    }
    if (row.step === 'pulling' || row.step === 'preparing' || row.step === 'starting' || row.step === 'removing') {
      // Interrupted mid-step: roll back to nothing; the reconcile that follows starts it again if it is wanted.
      await driver.remove(row.machine_id, row.state_dir);
      this.#local.record({ ...row, step: 'removed' }, `rolled back from ${row.step}`);
      this.#local.remove(row.machine_id);
    }
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
    await this.#o.catalog.putMachineStatus(status, events);
  }

  #event(machineId: string, type: MachineEvent['type'], status: string, source: MachineEvent['source'], request?: Record<string, unknown>): MachineEvent {
    return { id: newUlid(), machine_id: machineId, type, status, source, timestamp: Date.now(), ...(request ? { request } : {}) };
  }
}

const hostResolvConf = await readFile('/etc/resolv.conf', 'utf8').then(
  (s) => s.split('\n').filter((l) => /^(nameserver|search|options)\s/.test(l)).join('\n') + '\n',
  () => '',
);

function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms).unref());
}
