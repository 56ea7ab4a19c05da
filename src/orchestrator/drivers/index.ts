// The orchestrator's machine drivers: runc/crun (OciDriver) and gVisor (RunscDriver), chosen by name.
import type { Driver } from '../driver.ts';
import { TarmacError } from '../../shared/errors.ts';
import { OciDriver } from './runc.ts';
import { RunscDriver } from './runsc.ts';
import type { OciDriverOptions } from './oci-base.ts';

export { OciDriver } from './runc.ts';
export { RunscDriver, RUNSC_MEMORY_OVERHEAD_MB } from './runsc.ts';
export type { OciDriverOptions } from './oci-base.ts';
export { DENIED_SYSCALLS, DEFAULT_CAPS, INIT_PATH } from './oci-spec.ts';

export type DriverName = 'runc' | 'crun' | 'runsc';
export const driverNames: readonly DriverName[] = ['runc', 'crun', 'runsc'];

/** The driver called `name`; `opts.runtime` overrides the binary (defaults: runc, crun, runsc). */
export function createDriver(name: DriverName, opts: OciDriverOptions): Driver {
  switch (name) {
    case 'runc':
      return new OciDriver(opts);
    case 'crun':
      return new OciDriver({ ...opts, runtime: opts.runtime ?? 'crun' });
    case 'runsc':
      return new RunscDriver(opts);
    default:
      throw new TarmacError('invalid_argument', `unknown driver ${JSON.stringify(name)}: use one of ${driverNames.join(', ')}`);
  }
}
