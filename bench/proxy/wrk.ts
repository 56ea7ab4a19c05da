// Runs wrk (Debian) against one target and reads its numbers from a Lua `done` hook, in microseconds.
import { execFile } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';

export interface WrkResult {
  requests: number;
  seconds: number;
  rps: number;
  /** Latency percentiles in microseconds. */
  p50: number;
  p90: number;
  p99: number;
  max: number;
  /** Socket errors plus non-2xx/3xx responses. */
  errors: number;
}

const lua = `done = function(s, latency, requests)
  io.write(string.format("WRKJSON {\\"requests\\":%d,\\"duration\\":%d,\\"p50\\":%d,\\"p90\\":%d,\\"p99\\":%d,\\"max\\":%d,\\"errors\\":%d}\\n",
    s.requests, s.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout + s.errors.status))
end
`;

/** Writes the Lua report hook into `dir`; returns its path. */
export async function writeWrkScript(dir: string): Promise<string> {
  const path = join(dir, 'report.lua');
  await writeFile(path, lua);
  return path;
}

/** One wrk run: one thread, `connections` keep-alive connections, `seconds` long, every request with `host`. */
export function runWrk(script: string, port: number, connections: number, seconds: number, host: string): Promise<WrkResult> {
  const args = ['-t1', `-c${connections}`, `-d${seconds}s`, '--timeout', '2s', '--latency', '-s', script, '-H', `Host: ${host}`, `http://127.0.0.1:${port}/`];
  return new Promise((resolve, reject) => {
    execFile('wrk', args, { timeout: (seconds + 20) * 1000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`wrk ${args.join(' ')} failed: ${err.message} ${stderr}`));
      const line = stdout.split('\n').find((l) => l.startsWith('WRKJSON '));
      if (!line) return reject(new Error(`wrk printed no report: ${stdout}`));
      const r = JSON.parse(line.slice(8)) as { requests: number; duration: number; p50: number; p90: number; p99: number; max: number; errors: number };
      const secs = r.duration / 1e6;
      resolve({ requests: r.requests, seconds: secs, rps: r.requests / secs, p50: r.p50, p90: r.p90, p99: r.p99, max: r.max, errors: r.errors });
    });
  });
}
