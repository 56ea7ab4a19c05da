// Routing for an app's own addresses: backends of the service ports other than the shared 80/443 (TCP, TLS, PROXY protocol, UDP).
import type { Host, MachineSpec } from '../catalog/index.ts';
import { serviceTarget, type Backend } from './routing.ts';

/** PROXY protocol version a port asks for (Fly's `proxy_proto_options.version`, v1 by default). */
export type ProxyProtoVersion = 'v1' | 'v2';

/**
 * One machine's service port on an app address: a Backend (so the HTTP balancer's `choose` and concurrency limits
 * apply, counted per connection or UDP flow) plus what the listener does with it.
 */
export interface PortBackend extends Backend {
  readonly protocol: 'tcp' | 'udp';
  /** The port clients connect to on the app's addresses. */
  readonly publicPort: number;
  /** The port entry's handlers (`tls`, `http`, `proxy_proto`, …); empty for raw passthrough. */
  readonly handlers: readonly string[];
  /** Send a PROXY protocol header of this version before the client's bytes; undefined without `proxy_proto`. */
  readonly proxyProto: ProxyProtoVersion | undefined;
  /** The machine's service port (`internal_port`), also when `port` is its host's backhaul. */
  readonly internalPort: number;
}

/** An app's entry for its own addresses: the addresses, and the backends of every non-shared service port. */
export interface AppPorts {
  readonly ips: readonly string[];
  readonly backends: readonly PortBackend[];
}

/** Ports served on the shared listeners, routed by Host and SNI: never listened on per app. */
export const sharedPorts: ReadonlySet<number> = new Set([80, 443]);

function proxyProtoOf(handlers: readonly string[], options: { version?: ProxyProtoVersion | undefined } | undefined): ProxyProtoVersion | undefined {
  return handlers.includes('proxy_proto') ? options?.version ?? 'v1' : undefined;
}

/**
 * Backends of a machine on its app's addresses: one per `services[].ports[]` entry with a single `port` other than 80
 * and 443 for tcp (any port for udp). Through `via`'s backhaul when the machine runs on another host (tcp only: a UDP
 * port of a remote machine gets no backend).
 */
export function portBackendsOf(spec: MachineSpec, via?: Host): PortBackend[] {
  const out: PortBackend[] = [];
  for (const service of spec.config.services ?? []) {
    const target = serviceTarget(spec, service, via, service.protocol);
    if (service.protocol === 'udp' && target.via !== undefined) continue;
    for (const p of service.ports ?? []) {
      if (p.port === undefined || (service.protocol === 'tcp' && sharedPorts.has(p.port))) continue;
      const handlers = Object.freeze([...(p.handlers ?? [])]);
      out.push(Object.seal({
        ...target,
        h2: false,
        protocol: service.protocol,
        publicPort: p.port,
        handlers,
        proxyProto: proxyProtoOf(handlers, p.proxy_proto_options),
        internalPort: service.internal_port,
      }));
    }
  }
  return out;
}

/** True when two lists hold the same routing-relevant values (so the old objects, with their counts, are kept). */
export function samePortBackends(a: readonly PortBackend[], b: readonly PortBackend[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!;
    const y = b[i]!;
    if (x !== y && (x.machineId !== y.machineId || x.origin !== y.origin || x.via !== y.via || x.instanceId !== y.instanceId
      || x.region !== y.region || x.softLimit !== y.softLimit || x.hardLimit !== y.hardLimit || x.limitType !== y.limitType
      || x.protocol !== y.protocol || x.publicPort !== y.publicPort || x.internalPort !== y.internalPort
      || x.proxyProto !== y.proxyProto || x.handlers.join(',') !== y.handlers.join(','))) return false;
  }
  return true;
}
