// The DNS component's public face: `.internal` names from the catalog, scoped to the asking org; other names forwarded. Two engines: unbound (driven by Tarmac) and Node.
import { existsSync } from 'node:fs';
import type { DnsEngine, DnsServerOptions, RunningDns } from './engine.ts';
import { TarmacError } from '../shared/errors.ts';
import { startDnsServer } from './server.ts';
import { startUnboundDns, unboundBinary } from './unbound.ts';

export type { DnsEngine, DnsServerOptions, DnsListen, RunningDns } from './engine.ts';
export { startDnsServer } from './server.ts';
export { startUnboundDns, topCap, type UnboundDnsOptions, type UnboundTestHooks } from './unbound.ts';
export { parseUpstream, upstreamsFromResolvConf, type Upstream } from './forward.ts';

/** unbound where it is installed, else the Node server. */
export function defaultDnsEngine(binary = unboundBinary): DnsEngine {
  return existsSync(binary) ? 'unbound' : 'node';
}

/**
 * Starts the DNS server on `engine`; `stateDir` holds unbound's generated config and control socket. Without an
 * engine, unbound where installed, and the Node server if unbound cannot start (AppArmor confining it to its own
 * directories, say): logged on one line. An engine asked for explicitly that cannot start fails with the cause and the fix.
 */
export async function startDns(opts: DnsServerOptions & { engine?: DnsEngine | undefined; stateDir: string; unboundBinary?: string }): Promise<RunningDns> {
  const engine = opts.engine ?? defaultDnsEngine(opts.unboundBinary);
  if (engine === 'node') return startDnsServer(opts);
  try {
    return await startUnboundDns(opts);
  } catch (e) {
    if (opts.engine !== undefined || !(e instanceof TarmacError) || e.code !== 'unavailable') throw e;
    opts.log.warn({ reason: e.message }, 'unbound could not start: serving DNS with the node engine instead (set dns.engine to choose)');
    return startDnsServer(opts);
  }
}
