// Runs the driver conformance suite against runc (Debian's), with conmon as the monitor.
import { after } from 'node:test';
import { rm, access } from 'node:fs/promises';
import { silentLogger } from '../../shared/log.ts';
import { missingPrerequisites } from '../../../test/helpers/rootfs.ts';
import { OciDriver } from './runc.ts';
import { runDriverConformance } from './driver.case.ts';

const root = `/run/tarmac/test-runc-${process.pid}`;
after(() => rm(root, { recursive: true, force: true }));

const skip = missingPrerequisites('namespaces, mounts, cgroups', ['runc', 'conmon', 'ip', 'nsenter']);

runDriverConformance('runc', () => new OciDriver({ runtime: 'runc', root, log: silentLogger() }), {
  skip,
  runtimeHasState: (id) => access(`${root}/${id}`).then(() => true, () => false),
  cgroupDirs: (id) => ['memory', 'cpu', 'pids'].map((c) => `/sys/fs/cgroup/${c}/tarmac/${id}`),
});
