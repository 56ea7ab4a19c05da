// A report of what keeps a test file's process alive after its tests are done, for hangs seen only in full-suite runs.
import { writeSync } from 'node:fs';

/**
 * After `ms`, if the process is still alive, writes what keeps it alive (handle kinds, sockets' addresses, child
 * processes) to stderr. The timer is unref'd: a process that exits normally never prints anything.
 */
export function reportLingering(what: string, ms = 20_000): void {
  setTimeout(() => {
    const handles = (process as unknown as { _getActiveHandles(): unknown[] })._getActiveHandles();
    const lines = handles.map((h) => {
      const o = h as { constructor?: { name?: string }; remoteAddress?: string; remotePort?: number; localAddress?: string; localPort?: number; spawnfile?: string; pid?: number };
      const kind = o.constructor?.name ?? typeof h;
      if (kind === 'Socket' || kind === 'TLSSocket') return `${kind} local ${o.localAddress}:${o.localPort} remote ${o.remoteAddress}:${o.remotePort}`;
      if (kind === 'ChildProcess') return `${kind} ${o.spawnfile} pid ${o.pid}`;
      return kind;
    });
    writeSync(2, `\n${what}: still alive ${ms} ms after its tests ended; resources ${JSON.stringify(process.getActiveResourcesInfo())}\n` +
      `handles:\n  ${lines.join('\n  ')}\n`);
  }, ms).unref();
}
