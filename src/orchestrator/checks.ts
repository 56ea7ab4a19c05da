// Health checks of a running machine: tcp and http probes of its private address, run by the worker that hosts it.
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { connect } from 'node:net';
import { durationMs, namedChecks, type CheckStatus, type MachineSpec, type NamedCheck } from '../catalog/index.ts';
import { errorMessage } from '../shared/errors.ts';

/** Defaults for what a check leaves out (Fly's own: every 15 s, 2 s to answer, no grace). */
export const checkDefaults = { intervalMs: 15_000, timeoutMs: 2_000, gracePeriodMs: 0 } as const;
/** Until its first pass a check runs at least this often, so a machine gets traffic soon after its app listens. */
const firstPassIntervalMs = 1_000;
/** Characters of an http check's response body kept in its output. */
const outputBodyChars = 256;

/** The outcome of one probe. */
export interface ProbeResult {
  ok: boolean;
  output: string;
}

/**
 * Runs one check once against `address` (a machine's private IP, no brackets): a tcp check passes when a connection
 * opens, an http check when the answer is a 2xx. Both fail after the check's timeout.
 */
export async function probe(c: NamedCheck, address: string, signal?: AbortSignal): Promise<ProbeResult> {
  if (c.port === undefined) return { ok: false, output: `check ${c.name} has no port to probe; set checks.${c.name}.port` };
  const timeoutMs = c.check.timeout !== undefined ? durationMs(c.check.timeout) : checkDefaults.timeoutMs;
  const timeout = AbortSignal.timeout(Math.max(1, timeoutMs));
  const abort = signal ? AbortSignal.any([signal, timeout]) : timeout;
  const host = address.includes(':') ? `[${address}]` : address;
  try {
    if (c.type === 'tcp') {
      await tcpConnect(address, c.port, abort);
      return { ok: true, output: `TCP connect ${host}:${c.port}: Success` };
    }
    return await httpCheck(c, address, abort);
  } catch (e) {
    const why = timeout.aborted ? `timed out after ${timeoutMs} ms` : errorMessage(e);
    return { ok: false, output: c.type === 'tcp' ? `TCP connect ${host}:${c.port}: ${why}` : `${httpTarget(c, host)}: ${why}` };
  }
}

function tcpConnect(host: string, port: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host, port, signal });
    socket.once('connect', () => {
      socket.destroy();
      resolve();
    });
    socket.once('error', reject);
  });
}

function httpTarget(c: NamedCheck, host: string): string {
  return `HTTP ${c.check.method?.toUpperCase() ?? 'GET'} ${c.check.protocol ?? 'http'}://${host}:${c.port}${c.check.path ?? '/'}`;
}

async function httpCheck(c: NamedCheck, address: string, signal: AbortSignal): Promise<ProbeResult> {
  const check = c.check;
  const headers: Record<string, string[]> = {};
  for (const h of check.headers ?? []) headers[h.name] = [...(headers[h.name] ?? []), ...h.values];
  const options = {
    host: address, port: c.port, method: check.method?.toUpperCase() ?? 'GET', path: check.path ?? '/', headers, signal, agent: false,
  };
  const res = await new Promise<IncomingMessage>((resolve, reject) => {
    const req = check.protocol === 'https'
      ? httpsRequest({ ...options, rejectUnauthorized: check.tls_skip_verify !== true, ...(check.tls_server_name ? { servername: check.tls_server_name } : {}) }, resolve)
      : httpRequest(options, resolve);
    req.once('error', reject);
    req.end();
  });
  let body = '';
  try {
    for await (const chunk of res) {
      body += String(chunk);
      if (body.length >= outputBodyChars) break;
    }
  } finally {
    res.destroy();
  }
  const status = res.statusCode ?? 0;
  const host = address.includes(':') ? `[${address}]` : address;
  const text = body.slice(0, outputBodyChars).trim();
  return {
    ok: status >= 200 && status < 300,
    output: `${httpTarget(c, host)}: ${status} ${res.statusMessage ?? ''}${text ? ` Output: ${JSON.stringify(text)}` : ''}`,
  };
}

/**
 * The checks of one running instance. Each check runs at its interval from the start; its status is `warning` until
 * the first result, and a failure within the grace period stays `warning` (the machine gets no traffic then, but the
 * check is not failing yet); later failures are `critical`. `onChange` hears of every change of a status only, so
 * a steady check causes no catalog write.
 */
export class MachineChecks {
  readonly instanceId: string;
  readonly #results = new Map<string, CheckStatus>();
  readonly #abort = new AbortController();
  readonly #timers = new Set<NodeJS.Timeout>();

  constructor(spec: MachineSpec, onChange: () => void) {
    this.instanceId = spec.instance_id;
    const startedAt = Date.now();
    for (const c of namedChecks(spec.config)) {
      this.#results.set(c.name, { name: c.name, status: 'warning', output: 'waiting for the first check', updated_at: new Date(startedAt).toISOString() });
      const intervalMs = c.check.interval !== undefined ? durationMs(c.check.interval) : checkDefaults.intervalMs;
      const graceMs = c.check.grace_period !== undefined ? durationMs(c.check.grace_period) : checkDefaults.gracePeriodMs;
      let passed = false;
      const run = async () => {
        const r = await probe(c, spec.private_ip, this.#abort.signal);
        if (this.#abort.signal.aborted) return;
        passed ||= r.ok;
        const status = r.ok ? 'passing' : Date.now() - startedAt < graceMs ? 'warning' : 'critical';
        if (this.#results.get(c.name)?.status !== status) {
          this.#results.set(c.name, { name: c.name, status, output: r.output, updated_at: new Date().toISOString() });
          onChange();
        }
        this.#after(passed ? intervalMs : Math.min(intervalMs, firstPassIntervalMs), run);
      };
      this.#after(0, run);
    }
  }

  /** True when the instance has no checks at all. */
  get empty(): boolean {
    return this.#results.size === 0;
  }

  /** The latest result of every check, in config order. */
  results(): CheckStatus[] {
    return [...this.#results.values()].map((r) => ({ ...r }));
  }

  /** Stops probing; a probe under way is aborted and reports nothing. */
  stop(): void {
    this.#abort.abort();
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
  }

  #after(ms: number, fn: () => Promise<void>): void {
    if (this.#abort.signal.aborted) return;
    const t = setTimeout(() => {
      this.#timers.delete(t);
      void fn();
    }, ms);
    t.unref();
    this.#timers.add(t);
  }
}

/** True when two result lists say the same (names and statuses; outputs and times aside). */
export function sameCheckStatuses(a: readonly CheckStatus[] | undefined, b: readonly CheckStatus[]): boolean {
  if (a === undefined || a.length !== b.length) return false;
  return a.every((r, i) => r.name === b[i]!.name && r.status === b[i]!.status);
}
