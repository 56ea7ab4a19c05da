// The proxy's public face: start the HTTP proxy over a catalog reader; its routing table and request events.
export { startProxy, proxyRequestChannel } from './proxy.ts';
export type { ProxyOptions, ProxyTimeouts, RunningProxy, ProxyRequestEvent } from './proxy.ts';
export type { AppRoute, Backend, RoutingTable } from './routing.ts';
export { proxyErrorStatus, proxyErrorHeader } from './errors.ts';
export type { ProxyErrorCode } from './errors.ts';
