// Builds a tiny busybox-static root filesystem for tests (no registry needed).
import { mkdir, copyFile, symlink, writeFile, chmod } from 'node:fs/promises';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';

/** Applets the test images use; busybox provides each as a symlink. */
const applets = ['sh', 'ls', 'cat', 'echo', 'sleep', 'httpd', 'hostname', 'env', 'nc', 'ip', 'ifconfig', 'ping', 'wget', 'kill', 'id', 'head', 'dd', 'yes', 'true', 'false', 'mkdir', 'rm', 'ps', 'grep', 'tail', 'seq', 'date', 'trap', 'dmesg'];

/** Writes a busybox rootfs into `dir` (created); returns `dir`. `files` adds extra files (path → content, executable when under bin/ or cgi-bin/). */
export async function makeBusyboxRootfs(dir: string, files: Record<string, string> = {}): Promise<string> {
  for (const d of ['bin', 'etc', 'tmp', 'proc', 'sys', 'dev', 'var/www/cgi-bin', 'root']) await mkdir(join(dir, d), { recursive: true });
  await copyFile('/usr/bin/busybox', join(dir, 'bin/busybox'));
  for (const a of applets) await symlink('busybox', join(dir, 'bin', a)).catch(() => {});
  await writeFile(join(dir, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n');
  await writeFile(join(dir, 'etc/group'), 'root:x:0:\nnogroup:x:65534:\n');
  for (const [path, content] of Object.entries(files)) {
    const full = join(dir, path);
    await mkdir(join(full, '..'), { recursive: true });
    await writeFile(full, content);
    if (/(^|\/)(bin|cgi-bin)\//.test(path)) await chmod(full, 0o755);
  }
  return dir;
}

/**
 * Why a test that needs root (for `rootFor`) and `commands` on PATH cannot run here, for its `skip`; undefined when it
 * can. With runsc among the commands, runsc must also run on this host.
 */
export function missingPrerequisites(rootFor: string, commands: readonly string[]): string | undefined {
  if (process.getuid?.() !== 0) return `needs root (${rootFor})`;
  const missing = commands.filter((c) => !haveCommand(c));
  if (missing.length) return `not installed: ${missing.join(', ')}`;
  if (!commands.includes('runsc')) return undefined;
  try {
    execFileSync('runsc', ['--version'], { stdio: 'ignore' });
    return undefined;
  } catch {
    return 'runsc does not run on this host';
  }
}

/** True when the command exists on PATH. */
export function haveCommand(cmd: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}
