// Generates a machine's OCI runtime config.json (Docker-like defaults: caps, seccomp denylist, masked paths).
import type { RunSpec } from '../driver.ts';

/** Where tini-static is bind-mounted inside every machine. */
export const INIT_PATH = '/tarmac/tini';

/** Docker's default capability set. */
export const DEFAULT_CAPS = [
  'CAP_CHOWN', 'CAP_DAC_OVERRIDE', 'CAP_FSETID', 'CAP_FOWNER', 'CAP_MKNOD', 'CAP_NET_RAW', 'CAP_SETGID', 'CAP_SETUID',
  'CAP_SETFCAP', 'CAP_SETPCAP', 'CAP_NET_BIND_SERVICE', 'CAP_SYS_CHROOT', 'CAP_KILL', 'CAP_AUDIT_WRITE',
];

/**
 * Syscalls refused with EPERM. This first cut is a denylist (default action: allow), modelled on what Docker's
 * default profile does not allow to a container without CAP_SYS_ADMIN & co: kernel keyring, mounts and namespaces,
 * module loading, kexec, reboot, swap, clock setting, bpf/perf, handle-based opens, userfaultfd, NUMA policy,
 * cross-process memory access, obsolete and dangerous legacy calls. ptrace stays allowed (Docker allows it on
 * kernels >= 4.8, where seccomp can no longer be bypassed through it). An allowlist like Docker's is the next step.
 */
export const DENIED_SYSCALLS = [
  'acct', 'add_key', 'bpf', 'clock_adjtime', 'clock_settime', 'create_module', 'delete_module', 'finit_module',
  'fsconfig', 'fsmount', 'fsopen', 'fspick', 'get_kernel_syms', 'get_mempolicy', 'init_module', 'ioperm', 'iopl',
  'kcmp', 'kexec_file_load', 'kexec_load', 'keyctl', 'lookup_dcookie', 'mbind', 'mount', 'mount_setattr',
  'move_mount', 'move_pages', 'name_to_handle_at', 'nfsservctl', 'open_by_handle_at', 'open_tree',
  'perf_event_open', 'pivot_root', 'process_vm_readv', 'process_vm_writev', 'query_module', 'quotactl',
  'quotactl_fd', 'reboot', 'request_key', 'set_mempolicy', 'setns', 'settimeofday', 'stime', 'swapoff', 'swapon',
  'sysfs', '_sysctl', 'umount', 'umount2', 'unshare', 'uselib', 'userfaultfd', 'ustat', 'vm86', 'vm86old', 'vhangup',
  'adjtimex',
];

/** clone() flags that create namespaces: clone with any of them is refused, as Docker does. */
const CLONE_NS_FLAGS = [0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000];

const EPERM = 1;
const ENOSYS = 38;

export function seccompProfile(): Record<string, unknown> {
  const syscalls: Record<string, unknown>[] = [{ names: DENIED_SYSCALLS, action: 'SCMP_ACT_ERRNO', errnoRet: EPERM }];
  for (const flag of CLONE_NS_FLAGS) {
    syscalls.push({
      names: ['clone'],
      action: 'SCMP_ACT_ERRNO',
      errnoRet: EPERM,
      args: [{ index: 0, value: flag, valueTwo: flag, op: 'SCMP_CMP_MASKED_EQ' }],
    });
  }
  // clone3 passes its flags in memory, which seccomp cannot inspect: ENOSYS makes libcs fall back to clone().
  syscalls.push({ names: ['clone3'], action: 'SCMP_ACT_ERRNO', errnoRet: ENOSYS });
  return {
    defaultAction: 'SCMP_ACT_ALLOW',
    architectures: ['SCMP_ARCH_X86_64', 'SCMP_ARCH_X86', 'SCMP_ARCH_X32', 'SCMP_ARCH_AARCH64', 'SCMP_ARCH_ARM'],
    syscalls,
  };
}

const MASKED_PATHS = [
  '/proc/asound', '/proc/acpi', '/proc/kcore', '/proc/keys', '/proc/latency_stats', '/proc/timer_list',
  '/proc/timer_stats', '/proc/sched_debug', '/proc/scsi', '/sys/firmware', '/sys/devices/virtual/powercap',
];
const READONLY_PATHS = ['/proc/bus', '/proc/fs', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger'];

/** Devices a machine may use (Docker's default device cgroup allowlist). */
const ALLOWED_DEVICES: [string, number, number | null][] = [
  ['c', 1, 3], ['c', 1, 5], ['c', 1, 7], ['c', 1, 8], ['c', 1, 9], ['c', 5, 0], ['c', 5, 1], ['c', 5, 2], ['c', 136, null],
];

export interface OciSpecOptions {
  /** Absolute path of the mounted root filesystem. */
  rootfs: string;
  /** Host path of tini-static, bind-mounted read-only at INIT_PATH. */
  tiniPath: string;
  /** Host files bind-mounted over /etc/resolv.conf, /etc/hosts, /etc/hostname. */
  etcFiles: { resolvConf: string; hosts: string; hostname: string };
  /** Join spec.netnsPath (runc) or leave the network namespace out (runsc runs inside it under nsenter). */
  network: 'netns' | 'inherit';
  /** cgroups path handed to the runtime, or undefined when the driver applies cgroups itself. */
  cgroupsPath?: string;
  /** Also cap processes with RLIMIT_NPROC (for gVisor, whose processes are not host tasks a pids cgroup counts). */
  nprocLimit?: boolean;
}

function parseUser(user: string): { uid: number; gid: number } {
  if (!user) return { uid: 0, gid: 0 };
  const [u, g] = user.split(':');
  const uid = Number(u);
  const gid = g === undefined || g === '' ? uid : Number(g);
  return { uid: Number.isInteger(uid) ? uid : 0, gid: Number.isInteger(gid) ? gid : 0 };
}

/** Builds the OCI runtime spec (config.json contents) for one machine instance. */
export function buildOciSpec(spec: RunSpec, opts: OciSpecOptions): Record<string, unknown> {
  const caps = [...DEFAULT_CAPS];
  const memory = Math.max(4, spec.limits.memoryMb) * 1024 * 1024;
  const namespaces: Record<string, string>[] = [{ type: 'pid' }, { type: 'ipc' }, { type: 'uts' }, { type: 'mount' }];
  if (opts.network === 'netns') namespaces.push({ type: 'network', path: spec.netnsPath });
  const nosuid = ['nosuid', 'noexec', 'nodev'];
  const linux: Record<string, unknown> = {
    namespaces,
    maskedPaths: MASKED_PATHS,
    readonlyPaths: READONLY_PATHS,
    seccomp: seccompProfile(),
    resources: {
      devices: [
        { allow: false, access: 'rwm' },
        ...ALLOWED_DEVICES.map(([type, major, minor]) => ({ allow: true, type, major, ...(minor === null ? {} : { minor }), access: 'rwm' })),
      ],
      memory: { limit: memory, swap: memory },
      cpu: { quota: Math.max(1000, Math.round(spec.limits.cpus * 100000)), period: 100000 },
      pids: { limit: spec.limits.pids },
    },
  };
  if (opts.cgroupsPath) linux['cgroupsPath'] = opts.cgroupsPath;
  return {
    ociVersion: '1.0.2',
    process: {
      terminal: false,
      user: parseUser(spec.user),
      args: [INIT_PATH, '--', ...spec.args],
      env: Object.entries(spec.env).map(([k, v]) => `${k}=${v}`),
      cwd: spec.cwd || '/',
      capabilities: { bounding: caps, effective: caps, permitted: caps },
      rlimits: [
        { type: 'RLIMIT_NOFILE', hard: 20000, soft: 20000 },
        ...(opts.nprocLimit ? [{ type: 'RLIMIT_NPROC', hard: spec.limits.pids, soft: spec.limits.pids }] : []),
      ],
      noNewPrivileges: true,
    },
    root: { path: opts.rootfs, readonly: false },
    hostname: spec.hostname,
    mounts: [
      { destination: '/proc', type: 'proc', source: 'proc', options: nosuid },
      { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'] },
      { destination: '/dev/pts', type: 'devpts', source: 'devpts', options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620', 'gid=5'] },
      { destination: '/dev/shm', type: 'tmpfs', source: 'shm', options: [...nosuid, 'mode=1777', 'size=65536k'] },
      { destination: '/dev/mqueue', type: 'mqueue', source: 'mqueue', options: nosuid },
      { destination: '/sys', type: 'sysfs', source: 'sysfs', options: [...nosuid, 'ro'] },
      { destination: INIT_PATH, type: 'bind', source: opts.tiniPath, options: ['rbind', 'ro', 'nosuid', 'nodev'] },
      { destination: '/etc/resolv.conf', type: 'bind', source: opts.etcFiles.resolvConf, options: ['rbind', 'rprivate'] },
      { destination: '/etc/hosts', type: 'bind', source: opts.etcFiles.hosts, options: ['rbind', 'rprivate'] },
      { destination: '/etc/hostname', type: 'bind', source: opts.etcFiles.hostname, options: ['rbind', 'rprivate'] },
    ],
    linux,
  };
}
