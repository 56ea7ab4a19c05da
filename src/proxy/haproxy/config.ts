// The HAProxy data plane's configuration: Tarmac's routing table compiled into one HAProxy config and a host map.
import { acmeHttpPrefix } from '../acme-challenges.ts';
import type { ProxyTimeouts } from '../proxy.ts';
import type { Backend } from '../routing.ts';

/** An app HAProxy serves itself: its host names and its machines' http backends (all on this host, HTTP/1.1). */
export interface FastApp {
  readonly app: string;
  readonly hosts: readonly string[];
  readonly backends: readonly Backend[];
}

export interface HaproxyConfigInput {
  /** Where clients connect (the proxy's HTTP address). */
  readonly listen: { host: string; port: number };
  /** The runtime API socket (level admin). */
  readonly adminSocket: string;
  /** The host map file (host name → backend), written beside the config. */
  readonly hostsMap: string;
  /** Tarmac's Node proxy, which takes every request HAProxy does not serve itself. */
  readonly node: { host: string; port: number };
  /** Sent to the Node proxy in `tarmac-front` so it believes `tarmac-client-ip`. */
  readonly frontKey: string;
  readonly region: string;
  readonly threads: number;
  /**
   * Most client connections at once (HAProxy's own default assumes two file descriptors each, halving what the file
   * limit allows, though idle keep-alive clients hold one); the file limit is then raised as far as it goes.
   */
  readonly maxconn: number;
  /** The user and group HAProxy's workers run as (the master, which binds the ports, stays as it started); none: unchanged. */
  readonly runAs?: { readonly user: string; readonly group: string };
  readonly timeouts: Required<ProxyTimeouts>;
  readonly maxHeaders: number;
  /** Requests of one app that may wait for a machine below its hard limit (503 beyond). */
  readonly queuePerApp: number;
  /**
   * Per-request log lines, for request events: HAProxy's `log` target (global), `log-format`, and any sections the
   * target needs (a ring); none without.
   */
  readonly log?: { readonly target: string; readonly format: string; readonly sections?: readonly string[] };
  readonly apps: readonly FastApp[];
}

/** The backend the Node proxy is reached through. */
export const nodeBackend = 'tarmac';

/** Names HAProxy config can hold without quoting; an app or machine whose name is not one stays with the Node proxy. */
const plainName = /^[a-z0-9][a-z0-9-]{0,62}$/;
const plainHost = /^[a-z0-9.-]{1,253}$/;

/** The backend of an app. */
export function appBackend(app: string): string {
  return `app_${app}`;
}

/** The server of a backend: `m_<machine id>_<port>` (the request events take the machine id back out of it). */
export function serverName(b: Backend): string {
  return `m_${b.machineId}_${b.port}`;
}

/** True when HAProxy can carry the app: names it can hold as they are. */
export function configurable(app: FastApp): boolean {
  return plainName.test(app.app) && app.hosts.every((h) => plainHost.test(h)) && app.backends.every((b) => plainName.test(b.machineId));
}

/** Request headers a client may not set: the proxy's own (forwarding, request id, replay source, the front's). */
const droppedRequestHeaders = [
  'tarmac-front', 'tarmac-client-ip', 'fly-client-ip', 'x-forwarded-proto', 'x-forwarded-port', 'fly-forwarded-port',
  'fly-region', 'fly-request-id', 'fly-replay-src',
];

/** Hop-by-hop fields HAProxy does not remove itself (it handles Connection, Transfer-Encoding and Upgrade). */
const hopByHopRequest = ['keep-alive', 'proxy-connection', 'te', 'trailer'];
const hopByHopResponse = ['keep-alive', 'proxy-connection', 'trailer'];

/** A duration in HAProxy's syntax; 0 (no limit) becomes a day, HAProxy's timeouts having no "off". */
function ms(value: number): string {
  return `${value > 0 ? value : 86_400_000}ms`;
}

/** `host:port`, brackets around an IPv6 host: how HAProxy takes an address with a port. */
export function address(host: string, port: number): string {
  return `${host.includes(':') ? `[${host}]` : host}:${port}`;
}

/** HAProxy's reply arguments for one of Tarmac's plain-text errors, with its `tarmac-proxy-error` code. */
function reply(status: number, code: string, message: string): string {
  return `status ${status} content-type "text/plain; charset=utf-8" hdr tarmac-proxy-error ${code} hdr cache-control no-store string "${message}\\n"`;
}

/** A plain-text error HAProxy answers itself (for a status it produces). */
function httpError(status: number, code: string, message: string): string {
  return `  http-error ${reply(status, code, message)}`;
}

/** Most requests one server takes at once: the machine's hard limit, within what HAProxy holds. */
export function serverMaxconn(b: Backend): number {
  return Math.min(b.hardLimit, 1_000_000);
}

/** The config text and the host map's contents. */
export function haproxyConfig(c: HaproxyConfigInput): { config: string; hostsMap: string } {
  const t = c.timeouts;
  const lines: string[] = [
    'global',
    '  master-worker',
    `  nbthread ${c.threads}`,
    `  maxconn ${c.maxconn}`,
    '  no strict-limits',
    ...(c.runAs === undefined ? [] : [`  user ${c.runAs.user}`, `  group ${c.runAs.group}`]),
    `  stats socket ${c.adminSocket} mode 600 level admin expose-fd listeners`,
    // Room for the fields HAProxy adds; what a client may send is checked in the frontend.
    `  tune.http.maxhdr ${c.maxHeaders + 16}`,
    // Old processes of a reload finish their requests; long tunnels are cut after this.
    '  hard-stop-after 15m',
    ...(c.log === undefined ? [] : [`  ${c.log.target}`]),
    '',
    'defaults',
    '  mode http',
    ...(c.log === undefined ? [] : ['  log global', `  log-format "${c.log.format}"`]),
    '  option http-keep-alive',
    '  http-reuse safe',
    `  timeout connect ${ms(t.backendConnectMs)}`,
    `  timeout client ${ms(t.clientRequestMs)}`,
    `  timeout http-request ${ms(t.clientHeadersMs)}`,
    `  timeout http-keep-alive ${ms(t.keepAliveMs)}`,
    // An inactivity timeout over the whole exchange in HAProxy: the longer of the headers and body timeouts.
    `  timeout server ${ms(Math.max(t.backendHeadersMs, t.backendBodyMs))}`,
    `  timeout queue ${ms(t.queueMs)}`,
    // The Node proxy keeps tunnels (WebSockets) open however long they are idle: so does HAProxy, nearly.
    `  timeout tunnel ${ms(0)}`,
    '  timeout client-fin 5s',
    '',
    'frontend http',
    `  bind ${address(c.listen.host, c.listen.port)}`,
    `  unique-id-format "%{+X}o%Ts%rt%pid-${c.region}"`,
    // HAProxy 2.6 lets NUL and a bare CR through in header values (RFC 9110 §5.5: reject or replace) and takes any
    // method token, CONNECT and any HTTP/1.x version; the Node proxy refuses them all.
    `  http-request deny ${reply(400, 'bad_request', 'bad request: invalid method, version or header value')} if !{ method -m reg ^[A-Z]+$ } || METH_CONNECT || !{ req.ver 1.1 1.0 } || { req.hdrs -m reg \\\\x00|\\\\r(?!\\\\n) }`,
    `  http-request deny ${reply(431, 'headers_too_large', `too many request header fields (the limit is ${c.maxHeaders})`)} if { req.fhdr_cnt() gt ${c.maxHeaders} }`,
    ...[...droppedRequestHeaders, ...hopByHopRequest].map((h) => `  http-request del-header ${h}`),
    // Routed by Host (without port, lower case) through the map. The Node proxy takes everything the map does not
    // name and every request HAProxy would not handle as it does: a Host that is not a plain name[:port], a target not
    // in origin form, a machine or region asked for, an ACME HTTP-01 challenge, Connection naming other headers (the
    // Node proxy strips them), several X-Forwarded-For lines (it joins them).
    '  http-request set-var(txn.host) req.fhdr(host),field(1,:),lower',
    `  http-request set-var(txn.be) var(txn.host),map(${c.hostsMap})`,
    `  http-request set-var(txn.be) str(${nodeBackend}) if !{ var(txn.be) -m found } || !{ req.fhdr_cnt(host) eq 1 } || !{ req.fhdr(host) -m reg ^[A-Za-z0-9.-]+(:[0-9]{1,5})?$ } || !{ url_beg / }`,
    `  http-request set-var(txn.be) str(${nodeBackend}) if { req.hdr(fly-force-instance-id) -m found } || { req.hdr(fly-prefer-region) -m found } || { url_beg ${acmeHttpPrefix} }`,
    `  http-request set-var(txn.be) str(${nodeBackend}) if { req.fhdr_cnt(connection) gt 1 } || { req.fhdr(connection) -m reg -i [^,[:space:]] } !{ req.fhdr(connection) -m reg -i ^[[:space:]]*(keep-alive|close|upgrade)([[:space:]]*,[[:space:]]*(keep-alive|close|upgrade))*[[:space:]]*$ }`,
    `  http-request set-var(txn.be) str(${nodeBackend}) if { req.fhdr_cnt(x-forwarded-for) gt 1 }`,
    '  use_backend %[var(txn.be)]',
    `  default_backend ${nodeBackend}`,
    // The request id and Via on what HAProxy answers (the Node proxy sets its own).
    `  http-after-response set-header fly-request-id %[unique-id] unless { var(txn.be) -m str ${nodeBackend} }`,
    `  http-after-response add-header via "1.1 tarmac" unless { var(txn.be) -m str ${nodeBackend} }`,
    '',
    `backend ${nodeBackend}`,
    // The Node proxy keeps its own timeouts (queue, autostart, headers, body): HAProxy waits on it as long as needed.
    `  timeout server ${ms(0)}`,
    '  http-request set-log-level silent',
    `  http-request set-header tarmac-front ${c.frontKey}`,
    '  http-request set-header tarmac-client-ip %[src]',
    `  server node ${address(c.node.host, c.node.port)}`,
    '',
  ];
  const map: string[] = [];
  for (const a of c.apps) {
    const be = appBackend(a.app);
    for (const h of a.hosts) map.push(`${h} ${be}`);
    lines.push(
      `backend ${be}`,
      '  balance leastconn',
      '  retries 1',
      '  option redispatch 1',
      `  http-request set-var(txn.app) str(${a.app})`,
      // Past the queue bound, at once (as the Node proxy's queuePerApp).
      `  http-request return ${reply(503, 'over_capacity', `every machine of app ${a.app} is at its hard concurrency limit and ${c.queuePerApp} requests already wait`)} if { queue ge ${c.queuePerApp} }`,
      '  http-request set-header fly-client-ip %[src]',
      '  http-request set-header x-forwarded-for "%[req.fhdr(x-forwarded-for)], %[src]" if { req.fhdr(x-forwarded-for) -m found }',
      '  http-request set-header x-forwarded-for %[src] unless { req.fhdr(x-forwarded-for) -m found }',
      '  http-request set-header x-forwarded-proto http',
      '  http-request set-header x-forwarded-port %[dst_port]',
      '  http-request set-header fly-forwarded-port %[dst_port]',
      `  http-request set-header fly-region ${c.region}`,
      '  http-request set-header fly-request-id %[unique-id]',
      '  http-request add-header via "1.1 tarmac"',
      // fly-replay: HAProxy cannot send a request twice, so an app that asks for a replay is handed to the Node
      // proxy from then on (the host map entry changes at once; Tarmac keeps it across reloads), and the request that
      // asked is sent back to the client as a 307 to the same URL (a request with a body is not replayed by either).
      '  http-request set-var(txn.uri) url',
      '  http-request set-var(txn.bodyless) bool(true) if !{ req.hdr(transfer-encoding) -m found } !{ req.hdr(content-length) -m found } || { req.hdr(content-length) -m str 0 }',
      `  http-response set-map(${c.hostsMap}) %[var(txn.host)] ${nodeBackend} if { res.hdr(fly-replay) -m found } { var(txn.bodyless) -m bool }`,
      '  http-response redirect location %[var(txn.uri)] code 307 if { res.hdr(fly-replay) -m found } { var(txn.bodyless) -m bool }',
      ...hopByHopResponse.map((h) => `  http-response del-header ${h}`),
      httpError(502, 'backend_unreachable', `could not reach a machine of app ${a.app}`),
      // HAProxy answers 503 both when the wait for a machine below its hard limit runs out and when connecting failed
      // (after the retry); a server was picked only in the second case, which the Node proxy answers 502.
      httpError(503, 'over_capacity', `no machine of app ${a.app} took the request: all were at their hard limit until the wait ran out, or none could be reached`),
      '  http-after-response set-header tarmac-proxy-error backend_unreachable if { status 503 } { srv_id -m found } { res.hdr(tarmac-proxy-error) -m str over_capacity }',
      '  http-after-response set-status 502 if { status 503 } { res.hdr(tarmac-proxy-error) -m str backend_unreachable }',
      httpError(504, 'backend_timeout', `a machine of app ${a.app} did not answer in time`),
    );
    for (const b of a.backends) lines.push(`  server ${serverName(b)} ${address(b.address, b.port)} maxconn ${serverMaxconn(b)}`);
    lines.push('');
  }
  for (const section of c.log?.sections ?? []) lines.push(section, '');
  return { config: `${lines.join('\n')}\n`, hostsMap: `${map.join('\n')}\n` };
}
