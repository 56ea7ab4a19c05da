// Reads machines' console logs (conmon's k8s-file format), merged by time, optionally following new lines.
import { open, stat, watch } from 'node:fs/promises';
import { dirname, basename } from 'node:path';

export interface LogLine {
  timestamp: string;
  machine_id: string;
  stream: 'stdout' | 'stderr';
  message: string;
}

/** Parses one k8s-file line: `2024-05-01T12:00:00.123456789+00:00 stdout F message`. */
export function parseLogLine(machineId: string, line: string): LogLine | undefined {
  const m = /^(\S+) (stdout|stderr) ([FP]) ?(.*)$/.exec(line);
  if (!m) return undefined;
  return { timestamp: m[1]!, machine_id: machineId, stream: m[2] as 'stdout' | 'stderr', message: m[4] ?? '' };
}

/** One machine's log file read from an offset; keeps a partial last line for the next read. */
class FileTail {
  #offset = 0;
  #rest = '';
  constructor(readonly machineId: string, readonly path: string) {}

  async read(): Promise<LogLine[]> {
    const size = await stat(this.path).then((s) => s.size, () => -1);
    if (size < 0) return [];
    if (size < this.#offset) this.#offset = 0; // rotated or truncated
    if (size === this.#offset) return [];
    const fh = await open(this.path, 'r');
    try {
      const buf = Buffer.alloc(size - this.#offset);
      const { bytesRead } = await fh.read(buf, 0, buf.length, this.#offset);
      this.#offset += bytesRead;
      const text = this.#rest + buf.subarray(0, bytesRead).toString('utf8');
      const lines = text.split('\n');
      this.#rest = lines.pop() ?? '';
      const out: LogLine[] = [];
      for (const l of lines) {
        const parsed = parseLogLine(this.machineId, l);
        if (parsed) out.push(parsed);
      }
      return out;
    } finally {
      await fh.close();
    }
  }
}

/**
 * Yields the log lines of the given machines (path per machine id), oldest first; with `follow`, keeps
 * yielding new lines as they are written until `signal` aborts.
 */
export async function* readLogs(
  files: Array<{ machineId: string; path: string }>,
  opts: { follow: boolean; signal: AbortSignal; since?: Date },
): AsyncGenerator<LogLine> {
  const tails = files.map((f) => new FileTail(f.machineId, f.path));
  const since = opts.since?.toISOString();
  const drain = async () => {
    const lines = (await Promise.all(tails.map((t) => t.read()))).flat();
    lines.sort((a, b) => (a.timestamp < b.timestamp ? -1 : a.timestamp > b.timestamp ? 1 : 0));
    return since ? lines.filter((l) => l.timestamp >= since) : lines;
  };
  yield* await drain();
  if (!opts.follow) return;
  // Watch each machine's log directory (the file may not exist yet); any change triggers a read.
  const dirs = [...new Set(files.map((f) => dirname(f.path)))];
  const names = new Set(files.map((f) => basename(f.path)));
  let wake: (() => void) | undefined;
  let pending = false;
  const poke = () => {
    pending = true;
    wake?.();
  };
  const watchers = dirs.map(async (dir) => {
    try {
      for await (const ev of watch(dir, { signal: opts.signal })) if (!ev.filename || names.has(ev.filename)) poke();
    } catch {
      /* aborted, or the directory went away with its machine */
    }
  });
  opts.signal.addEventListener('abort', poke, { once: true });
  try {
    while (!opts.signal.aborted) {
      if (!pending) await new Promise<void>((r) => (wake = r));
      wake = undefined;
      pending = false;
      if (opts.signal.aborted) break;
      yield* await drain();
    }
  } finally {
    opts.signal.removeEventListener('abort', poke);
    void Promise.allSettled(watchers);
  }
}
