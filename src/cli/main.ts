// Entry of the `tarmac` CLI: parses argv, runs the command, and turns every expected failure into one line.
import { readFileSync } from 'node:fs';
import { parseCommandLine, UsageError } from './args.ts';
import type { Io } from './commands.ts';

/** Runs the CLI with the real process streams; resolves to the exit code. */
export async function main(argv: string[]): Promise<number> {
  // `tarmac logs | head` closes stdout early: that is not an error.
  process.stdout.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(0);
    throw e;
  });
  const interrupt = new AbortController();
  return runCli(argv, {
    stdout: process.stdout,
    stderr: process.stderr,
    stdin: process.stdin,
    env: process.env,
    cwd: process.cwd(),
    interrupt: interrupt.signal,
  }, () => {
    // Commands that run until interrupted (logs --follow) end cleanly on Ctrl-C.
    process.once('SIGINT', () => interrupt.abort());
  });
}

/** The CLI over any streams and environment (tests call this directly). */
export async function runCli(argv: readonly string[], io: Io, onInterruptible: () => void = () => {}): Promise<number> {
  try {
    const parsed = parseCommandLine(argv, io.env);
    if (parsed.kind === 'help') {
      io.stdout.write(parsed.text);
      return 0;
    }
    if (parsed.kind === 'host') {
      const { hostCommand } = await import('./host.ts');
      return await hostCommand(parsed.argv);
    }
    const { command, global } = parsed;
    if (command.name === 'version') {
      const v = version();
      io.stdout.write(global.json ? JSON.stringify({ version: v }) + '\n' : `tarmac ${v}\n`);
      return 0;
    }
    if (command.name === 'logs' && command.follow) onInterruptible();
    const { runCommand } = await import('./commands.ts');
    return await runCommand(command, global, io);
  } catch (e) {
    return reportError(e, io);
  }
}

/** Prints `Error: <message>` as one line; 2 for usage errors, 1 otherwise. Stacks only with TARMAC_DEBUG. */
export function reportError(e: unknown, io: Pick<Io, 'stderr' | 'env'>): number {
  const expected = e instanceof Error && (e.name === 'UsageError' || e.name === 'TarmacError' || e.name === 'ApiError');
  const message = (e instanceof Error ? e.message : String(e)).replace(/\s*\n\s*/g, ' ').trim() || 'unknown error';
  io.stderr.write(`Error: ${message}\n`);
  if (!expected && io.env['TARMAC_DEBUG'] && e instanceof Error && e.stack) io.stderr.write(`${e.stack}\n`);
  return e instanceof UsageError ? 2 : 1;
}

function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}
