// The Driver contract: what an isolation runtime (runc, gVisor runsc, later Firecracker) must do for a machine.

/** The OCI image config fields a machine's process is built from. */
export interface ImageConfig {
  Entrypoint?: string[];
  Cmd?: string[];
  Env?: string[];
  WorkingDir?: string;
  User?: string;
  Labels?: Record<string, string>;
  StopSignal?: string;
}

/** Everything a driver needs to run one instance of a machine. Paths are absolute. */
export interface RunSpec {
  /** Machine id: also the hostname and the container id stem. */
  id: string;
  instanceId: string;
  /** Unpacked image root filesystem, shared read-only between machines (overlay lower dir). */
  imageRootfs: string;
  /** Per-machine directory the driver owns (overlay upper/work, bundle, runtime state). */
  stateDir: string;
  /** argv of the machine's process (after entrypoint/cmd/init overrides); run under tini as PID 1. */
  args: string[];
  env: Record<string, string>;
  cwd: string;
  /** "uid[:gid]" numeric, or empty for root. */
  user: string;
  hostname: string;
  /** Path of the machine's network namespace (e.g. /var/run/netns/tm-<id>), made by the orchestrator. */
  netnsPath: string;
  /** Lines for the machine's /etc/hosts (the driver writes /etc/resolv.conf itself: the host's DNS server). */
  hosts: string;
  limits: { cpus: number; memoryMb: number; pids: number };
  /** File the driver appends timestamped stdout/stderr lines to; must outlive the host process. */
  logPath: string;
}

export interface ExitStatus {
  /** Exit code of the process, 128+signal when killed by a signal. */
  code: number;
  /** Signal number that killed it, 0 when it exited. */
  signal: number;
  oomKilled: boolean;
  exitedAt: Date;
}

/** A started instance. Its `exited` promise resolves exactly once, even after `recover`. */
export interface RunningMachine {
  readonly id: string;
  /** Host pid of the machine's init. */
  readonly pid: number;
  readonly exited: Promise<ExitStatus>;
  /** Sends a signal (name like "SIGTERM") to the machine's init, which forwards it to the process. */
  kill(signal: string): Promise<void>;
  /** Sends `signal`, waits up to `timeoutMs`, then SIGKILLs; resolves with the exit. */
  stop(signal: string, timeoutMs: number): Promise<ExitStatus>;
}

export interface Driver {
  /** "runc", "runsc", … as chosen by host config or machine. */
  readonly name: string;
  /** Creates the instance's root filesystem and starts it. Throws TarmacError on user-fixable failures. */
  start(spec: RunSpec, signal?: AbortSignal): Promise<RunningMachine>;
  /**
   * After a host restart: reattaches to instance `id` if it still runs, or reports how it ended while
   * the host was down. `undefined` when the driver knows nothing of it.
   */
  recover(id: string, stateDir: string): Promise<RunningMachine | { exited: ExitStatus } | undefined>;
  /** Removes every trace of the instance: runtime state, mounts, cgroups, its rootfs. Idempotent. */
  remove(id: string, stateDir: string): Promise<void>;
  /**
   * Stops watching the machines it runs (the host is shutting down; the machines keep running, and `recover` after
   * the next start reattaches). Their `exited` promises stay pending.
   */
  release(): void;
}
