// The DNS server's public face: `.internal` names from the catalog, scoped to the asking org; other names forwarded.
export { startDnsServer, type DnsServerOptions, type DnsListen, type RunningDns } from './server.ts';
export { parseUpstream, upstreamsFromResolvConf, type Upstream } from './forward.ts';
