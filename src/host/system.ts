// Checks the system packages a worker host needs, and installs them with apt-get when run as root.
import { execFile } from 'node:child_process';
import { access, constants } from 'node:fs/promises';
import { delimiter, join } from 'node:path';
import { promisify } from 'node:util';
import { TarmacError } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';

const run = promisify(execFile);

/** Binary → Debian package that provides it. */
export function requiredPackages(runtimes: string[]): Array<{ binary: string; pkg: string }> {
  const need = [
    { binary: 'conmon', pkg: 'conmon' },
    { binary: 'umoci', pkg: 'umoci' },
    { binary: 'tini-static', pkg: 'tini' },
    { binary: 'ip', pkg: 'iproute2' },
    { binary: 'nsenter', pkg: 'util-linux' },
    { binary: 'nft', pkg: 'nftables' },
  ];
  for (const r of new Set(runtimes)) need.push({ binary: r, pkg: r === 'runsc' ? 'runsc' : r === 'crun' ? 'crun' : 'runc' });
  return need;
}

export async function findBinary(name: string): Promise<string | undefined> {
  const dirs = [...(process.env['PATH'] ?? '').split(delimiter), '/usr/sbin', '/usr/bin', '/sbin', '/bin'];
  for (const d of dirs) {
    const p = join(d, name);
    if (await access(p, constants.X_OK).then(() => true, () => false)) return p;
  }
  return undefined;
}

/**
 * Makes sure every needed binary exists. As root (and allowed) installs the missing packages with apt-get,
 * saying so; otherwise fails with the one command that installs them.
 */
export async function ensureSystemPackages(runtimes: string[], opts: { install: boolean; log: Logger }): Promise<void> {
  const missing: string[] = [];
  for (const { binary, pkg } of requiredPackages(runtimes)) if (!(await findBinary(binary)) && !missing.includes(pkg)) missing.push(pkg);
  if (missing.length === 0) return;
  const command = `apt-get install -y ${missing.join(' ')}`;
  const isRoot = process.getuid?.() === 0;
  if (!isRoot || !opts.install) {
    throw new TarmacError('failed_precondition', `missing system packages: ${missing.join(', ')}. Install them with: sudo ${command}${isRoot ? '' : ' (and run Tarmac as root: it creates network namespaces and containers)'}`);
  }
  opts.log.info({ packages: missing }, 'installing missing system packages with apt-get');
  process.stderr.write(`tarmac: installing system packages: ${missing.join(' ')} (apt-get)\n`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  try {
    await run('apt-get', ['update', '-qq'], { env, maxBuffer: 64 << 20 });
    await run('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...missing], { env, maxBuffer: 64 << 20 });
  } catch (e) {
    throw new TarmacError('failed_precondition', `could not install ${missing.join(', ')} with apt-get: ${(e as { stderr?: string }).stderr?.trim().split('\n').pop() ?? (e as Error).message}. Run: ${command}`, { cause: e });
  }
}
