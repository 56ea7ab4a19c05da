// The gVisor driver: runsc under nsenter in the machine's netns (--network=host), cgroup limits applied around the sandbox.
import { writeFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { RunSpec } from '../driver.ts';
import { OciRuntimeDriver, CGROUP_CONTROLLERS, CGROUP_ROOT, resolveBinary, statePaths, run, exists, type OciDriverOptions, type Exec } from './oci-base.ts';
import { CGROUP_PARENT } from './runc.ts';

/** Memory the sandbox itself (Sentry, Gofer) needs on top of what the machine's processes may use. */
export const RUNSC_MEMORY_OVERHEAD_MB = 64;
/** Host tasks (threads) the sandbox itself may use on top of the machine's processes. */
export const RUNSC_PIDS_HEADROOM = 512;

/**
 * gVisor's runsc refuses a network namespace path in config.json, so the spec has none and runsc runs inside the
 * machine's namespace with `--network=host`: gVisor's "host" network is then the machine's own veth. That hands
 * socket calls to the host kernel's TCP/IP stack instead of gVisor's own netstack, so a kernel networking bug is
 * reachable from the machine again; the namespace still confines addresses, routes and interfaces. With
 * `--ignore-cgroups` runsc does not touch cgroups, so the driver makes the machine's cgroups itself and the create
 * wrapper enters them before exec'ing runsc: the Sentry and Gofer it forks inherit them.
 */
export class RunscDriver extends OciRuntimeDriver {
  readonly name = 'runsc';

  constructor(opts: OciDriverOptions) {
    super(opts, { runtime: 'runsc', root: '/run/tarmac/runsc' });
  }

  protected override globalArgs(): string[] {
    return ['--network=host', '--ignore-cgroups', '--oci-seccomp'];
  }

  protected specOptions(_spec: RunSpec) {
    return { network: 'inherit' as const, nprocLimit: true };
  }

  protected cgroupDirs(containerId: string): string[] {
    return CGROUP_CONTROLLERS.map((c) => `${CGROUP_ROOT}/${c}/${CGROUP_PARENT}/${containerId}`);
  }

  /**
   * The sandbox's control server listens on an abstract unix socket, which lives in the sandbox's network
   * namespace: commands that talk to it run there too (entered through the sandbox's /proc entry, which works even
   * after the namespace's name is gone).
   */
  protected override async runtimeFor(containerId: string, args: string[]): Promise<Exec> {
    let pid = this.pids.get(containerId);
    if (!pid) {
      const state = await this.runtime(['state', containerId]).then((r) => JSON.parse(r.stdout) as { pid?: number }, () => undefined);
      pid = state?.pid;
    }
    const netns = pid ? `/proc/${pid}/ns/net` : undefined;
    if (!netns || !(await exists(netns))) return this.runtime(args);
    return run(await resolveBinary('nsenter'), [`--net=${netns}`, await resolveBinary(this.runtimeBin), '--root', this.root, ...this.globalArgs(), ...args]);
  }

  protected override async prepare(spec: RunSpec): Promise<void> {
    const id = this.containerId(spec.id);
    const [memory, cpu, pids] = this.cgroupDirs(id) as [string, string, string];
    await Promise.all([memory, cpu, pids].map((d) => mkdir(d, { recursive: true })));
    const bytes = String((Math.max(4, spec.limits.memoryMb) + RUNSC_MEMORY_OVERHEAD_MB) * 1024 * 1024);
    // memsw must never be below the limit: set the limit first on a fresh (unlimited) cgroup.
    await writeFile(join(memory, 'memory.limit_in_bytes'), bytes);
    await writeFile(join(memory, 'memory.memsw.limit_in_bytes'), bytes).catch(() => {});
    await writeFile(join(cpu, 'cpu.cfs_period_us'), '100000');
    await writeFile(join(cpu, 'cpu.cfs_quota_us'), String(Math.max(1000, Math.round(spec.limits.cpus * 100000))));
    // The machine's own limit is RLIMIT_NPROC inside the sandbox (see specOptions). The host pids cgroup counts the
    // Sentry's and Gofer's threads and, on the ptrace platform, a host task per application thread; hitting it
    // crashes the whole sandbox instead of failing one fork, so it is only a backstop with generous headroom.
    await writeFile(join(pids, 'pids.max'), String(RUNSC_PIDS_HEADROOM + 4 * spec.limits.pids));
  }

  protected override async createRuntime(spec: RunSpec, stateDir: string): Promise<string> {
    const runsc = await resolveBinary(this.runtimeBin);
    const nsenter = await resolveBinary('nsenter');
    const procs = this.cgroupDirs(this.containerId(spec.id)).map((d) => `echo $$ > ${d}/cgroup.procs`);
    const wrapper = join(statePaths(stateDir).bundle, 'runsc-create');
    await writeFile(wrapper, ['#!/bin/sh', 'set -e', ...procs, `exec ${nsenter} --net=${spec.netnsPath} ${runsc} "$@"`, ''].join('\n'), { mode: 0o755 });
    return wrapper;
  }

  /** runsc keeps its state in files named after the sandbox, not a directory per container: ask it. */
  protected override async hasRuntimeState(containerId: string): Promise<boolean> {
    return (await this.runtimeState(containerId)) !== undefined;
  }
}
