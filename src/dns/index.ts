// The DNS component's public face: `.internal` names from the catalog, scoped to the asking org; other names forwarded. Two engines: unbound (driven by Tarmac) and Node.
import { existsSync } from 'node:fs';
import type { DnsEngine, DnsServerOptions, RunningDns } from './engine.ts';
import { startDnsServer } from './server.ts';
import { startUnboundDns, unboundBinary } from './unbound.ts';

export type { DnsEngine, DnsServerOptions, DnsListen, RunningDns } from './engine.ts';
export { startDnsServer } from './server.ts';
export { startUnboundDns, topCap, type UnboundDnsOptions } from './unbound.ts';
export { parseUpstream, upstreamsFromResolvConf, type Upstream } from './forward.ts';

/** unbound where it is installed, else the Node server. */
export function defaultDnsEngine(): DnsEngine {
  return existsSync(unboundBinary) ? 'unbound' : 'node';
}

/** Starts the DNS server on `engine`; `stateDir` holds unbound's generated config and control socket. */
export function startDns(opts: DnsServerOptions & { engine: DnsEngine; stateDir: string }): Promise<RunningDns> {
  return opts.engine === 'unbound' ? startUnboundDns(opts) : startDnsServer(opts);
}
