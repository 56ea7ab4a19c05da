// Open-loop load for benchmarks: operations started on a fixed schedule, never waiting for earlier ones to finish.
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Starts `op(i)` for i = 0 … count-1 at `rate` per second, then waits for every one and, up to 30 s, for
 * `outstanding()` (what the benchmark still waits to observe) to reach 0.
 */
export async function openLoop(rate: number, count: number, op: (i: number) => Promise<unknown>, outstanding: () => number): Promise<void> {
  const started: Array<Promise<unknown>> = [];
  const t0 = performance.now();
  for (let i = 0; i < count; i++) {
    const wait = t0 + (i * 1000) / rate - performance.now();
    if (wait > 0) await sleep(wait);
    started.push(op(i));
  }
  await Promise.all(started);
  const deadline = Date.now() + 30_000;
  while (outstanding() > 0 && Date.now() < deadline) await sleep(10);
}
