// The runc driver (also crun and other runc-compatible runtimes): machines as OCI containers joined to their netns.
import type { RunSpec } from '../driver.ts';
import { OciRuntimeDriver, CGROUP_CONTROLLERS, CGROUP_ROOT, type OciDriverOptions } from './oci-base.ts';

/** Cgroup parent under which every machine's cgroup lives (in each v1 controller). */
export const CGROUP_PARENT = 'tarmac';

export class OciDriver extends OciRuntimeDriver {
  readonly name: string;

  constructor(opts: OciDriverOptions) {
    const runtime = opts.runtime ?? 'runc';
    const base = runtime.split('/').pop() ?? 'runc';
    super(opts, { runtime, root: `/run/tarmac/${base}` });
    this.name = base;
  }

  protected specOptions(spec: RunSpec) {
    return { network: 'netns' as const, cgroupsPath: `/${CGROUP_PARENT}/${this.containerId(spec.id)}` };
  }

  protected cgroupDirs(containerId: string): string[] {
    return CGROUP_CONTROLLERS.map((c) => `${CGROUP_ROOT}/${c}/${CGROUP_PARENT}/${containerId}`);
  }
}
