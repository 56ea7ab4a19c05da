// Daemons Tarmac runs as its children (unbound, HAProxy): started so that they die with it, their exit as a promise.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createInterface } from 'node:readline';

const setprivBinary = '/usr/bin/setpriv';

export interface TiedChild {
  readonly child: ChildProcess;
  /** Resolves once it is gone: `exit code N`, `signal S`, or why it could not start. */
  readonly exited: Promise<string>;
}

/**
 * Starts `binary` with `args` so that it is killed when this process dies, even by SIGKILL (through `setpriv
 * --pdeathsig KILL` where util-linux has it), stdin and stdout closed; each line it writes to stderr goes to `onLine`.
 */
export function spawnTied(binary: string, args: readonly string[], onLine: (line: string) => void): TiedChild {
  const [bin, ...argv] = existsSync(setprivBinary) ? [setprivBinary, '--pdeathsig', 'KILL', '--', binary, ...args] : [binary, ...args];
  const child = spawn(bin!, argv, { stdio: ['ignore', 'ignore', 'pipe'] });
  createInterface({ input: child.stderr! }).on('line', onLine);
  const exited = new Promise<string>((resolve) => {
    child.once('error', (e) => resolve(e.message));
    child.once('exit', (code, signal) => resolve(signal ? `signal ${signal}` : `exit code ${code}`));
  });
  return { child, exited };
}
