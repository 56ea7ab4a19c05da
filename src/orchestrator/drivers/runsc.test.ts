// Runs the driver conformance suite against gVisor's runsc (ptrace platform, no KVM needed), with conmon as the monitor.
import { after } from 'node:test';
import { rm, access } from 'node:fs/promises';
import { silentLogger } from '../../shared/log.ts';
import { missingPrerequisites } from '../../../test/helpers/rootfs.ts';
import { RunscDriver } from './runsc.ts';
import { runDriverConformance } from './driver.case.ts';

const root = `/run/tarmac/test-runsc-${process.pid}`;
after(() => rm(root, { recursive: true, force: true }));

const whyNot = () => missingPrerequisites('namespaces, mounts, cgroups', ['runsc', 'conmon', 'ip', 'nsenter']);

runDriverConformance('runsc', () => new RunscDriver({ root, log: silentLogger() }), {
  skip: whyNot(),
  runtimeHasState: async (id) => {
    // runsc keeps `<id>.state` (and a lock) files in its root.
    for (const f of [`${root}/${id}.state`, `${root}/${id}`]) if (await access(f).then(() => true, () => false)) return true;
    return false;
  },
  cgroupDirs: (id) => ['memory', 'cpu', 'pids'].map((c) => `/sys/fs/cgroup/${c}/tarmac/${id}`),
});
