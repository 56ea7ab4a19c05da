// The proxy's public face: start the HTTP proxy over a catalog reader; its routing table and request events.
export { startProxy, proxyRequestChannel, proxyQueueChannel } from './proxy.ts';
export type { ProxyOptions, ProxyTimeouts, ProxyLimits, RunningProxy, ProxyRequestEvent, ProxyQueueEvent } from './proxy.ts';
export { proxyWorkerHeapFlags, startProxyCluster } from './cluster.ts';
export { startHaproxyPlane, type HaproxyPlaneOptions } from './haproxy/plane.ts';
export { haproxyBinary } from './haproxy/process.ts';
export { startStoppedMachine, type AutostartOptions } from './autostart.ts';
export { startAutostop, stopIdleMachine, type AutostopOptions, type RunningAutostop } from './autostop.ts';
export type { ProxyClusterOptions } from './cluster.ts';
export type { AppRoute, Backend, RouteSource, RoutingTable } from './routing.ts';
export { defaultConcurrency } from './routing.ts';
export { proxyErrorStatus, proxyErrorHeader } from './errors.ts';
export type { ProxyErrorCode } from './errors.ts';
export { proxyMetrics, metricsHandler, trackProxyMetrics } from './metrics.ts';
export { proxyTlsChannel, type ProxyTlsEvent } from './tls.ts';
export { proxyConnectionChannel, type ProxyConnectionEvent } from './listeners.ts';
