// The DNS component's contract: the options every engine takes and what a running one offers (Node in server.ts, unbound in unbound.ts).
import type { Logger } from '../shared/log.ts';
import type { Upstream } from './forward.ts';
import type { ZoneSource } from './zone.ts';

/** Who answers the datagrams: unbound driven by Tarmac (the default where installed), or Tarmac's own Node server. */
export type DnsEngine = 'unbound' | 'node';

export interface DnsListen {
  host: string;
  port: number;
}

export interface DnsServerOptions {
  /** The catalog (or its local mirror): read once, then followed through change batches. */
  catalog: ZoneSource;
  /** Addresses served over both UDP and TCP. One already taken is retried in the background (see `listening`). */
  listen: readonly DnsListen[];
  /** Resolvers for names outside `.internal`; none: such names get SERVFAIL. */
  upstreams: readonly Upstream[];
  /** CIDR ranges whose queries see every org's names (other non-machine sources are refused). */
  trusted: readonly string[];
  /** Region of this host: the "nearest" of trusted askers and of machines the zone does not know. */
  region: string;
  log: Logger;
  /** Per upstream, before trying the next (default 2000 ms). */
  forwardTimeoutMs?: number;
}

export interface RunningDns {
  readonly engine: DnsEngine;
  /** Listeners bound so far (host, port); the ones still being retried are missing. */
  listening(): DnsListen[];
  /** The process that answers queries (unbound's, or this one for the Node engine); undefined while unbound restarts. */
  pid(): number | undefined;
  close(): Promise<void>;
}
