// Figures the proxy benchmark's sections share: medians and percentiles, and how busy the rest of the machine was while one ran.
import { readFileSync } from 'node:fs';
import { cpus, release, totalmem } from 'node:os';
import { treeCpuSeconds } from './processes.ts';

/** The median of `xs` (the mean of the middle two for an even count). */
export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** The `p`th percentile (nearest rank) of `sorted`, which must be in ascending order. */
export function percentileOfSorted(sorted: ArrayLike<number>, p: number): number {
  return sorted[Math.max(0, Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1))] ?? NaN;
}

/** CPU seconds all processes on the machine spent busy (not idle or iowait), from /proc/stat. */
export function machineBusySeconds(): number {
  const f = readFileSync('/proc/stat', 'latin1').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  const total = f.slice(0, 8).reduce((a, b) => a + b, 0);
  return (total - f[3]! - f[4]!) / 100;
}

/** The 1, 5 and 15 minute load averages. */
export const loadavg = (): string => readFileSync('/proc/loadavg', 'latin1').trim().split(' ').slice(0, 3).join(' ');

/** The machine this runs on, as the results describe it. */
export const machine = (): string =>
  `${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, ${Math.round(totalmem() / 2 ** 30)} GiB, Linux ${release()}, Node ${process.version}`;

/**
 * Starts watching the machine's load; the returned function ends the watch and says, as a sentence for the results,
 * the load averages before and after and how many cores processes other than this one and its children used meanwhile.
 */
export function watchLoad(): () => string {
  const before = loadavg();
  const t0 = performance.now();
  const busy0 = machineBusySeconds();
  const ours0 = treeCpuSeconds(process.pid);
  return () => {
    const others = (machineBusySeconds() - busy0 - (treeCpuSeconds(process.pid) - ours0)) / ((performance.now() - t0) / 1000);
    return `Load average before ${before}, after ${loadavg()}; processes other than the benchmark's used ${others.toFixed(2)} cores on average while it ran (${others > 0.2 ? 'a busy machine: compare ratios, not absolutes' : 'a quiet machine'}).`;
  };
}
