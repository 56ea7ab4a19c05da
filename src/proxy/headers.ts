// Header rewriting on the hot path: hop-by-hop stripping and the Fly-style forwarding headers, on flat arrays.

/** Hop-by-hop headers (RFC 9110 §7.6.1 plus the legacy ones); never forwarded in either direction. */
export const hopByHop: ReadonlySet<string> = new Set([
  'connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade',
]);

/** What the request loop does with a header, by lowercase name; names not listed pass through untouched. */
const Act = { Hop: 1, Connection: 2, TransferEncoding: 3, Host: 4, ContentLength: 5, ForwardedFor: 6, Drop: 7 } as const;
type Act = (typeof Act)[keyof typeof Act];

const requestActs = new Map<string, Act>([
  ['connection', Act.Connection],
  ['transfer-encoding', Act.TransferEncoding],
  ['keep-alive', Act.Hop],
  ['proxy-connection', Act.Hop],
  ['te', Act.Hop],
  ['trailer', Act.Hop],
  ['upgrade', Act.Hop],
  ['host', Act.Host],
  ['content-length', Act.ContentLength],
  ['x-forwarded-for', Act.ForwardedFor],
  // Set by the proxy; a client's own values would be spoofable, so they are dropped.
  ['fly-client-ip', Act.Drop],
  ['x-forwarded-proto', Act.Drop],
  ['x-forwarded-port', Act.Drop],
  ['fly-forwarded-port', Act.Drop],
  ['fly-region', Act.Drop],
  ['fly-request-id', Act.Drop],
  // node:http answers `Expect: 100-continue` itself; undici refuses to forward it.
  ['expect', Act.Drop],
]);

/** Headers never removed because a client listed them in Connection: they frame or route the request. */
const connectionProtected: ReadonlySet<string> = new Set(['host', 'content-length']);

/** The parsed parts of a request's headers that the proxy needs, plus the headers to forward. */
export interface RequestHead {
  /** Flat [name, value, …] array to send to the machine; the proxy's own headers are appended by `addForwarding`. */
  headers: string[];
  host: string | undefined;
  hasBody: boolean;
  /** A reason the request is unacceptable (e.g. two Host headers), or undefined. */
  invalid: string | undefined;
  forwardedFor: string | undefined;
}

/** Splits `rawHeaders` into what to forward and what the proxy acts on. One pass, one output array. */
export function readRequestHead(raw: readonly string[]): RequestHead {
  const headers: string[] = [];
  let host: string | undefined;
  let hasBody = false;
  let invalid: string | undefined;
  let forwardedFor: string | undefined;
  let connection: string | undefined;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!;
    const value = raw[i + 1]!;
    const act = requestActs.get(name.toLowerCase());
    if (act === undefined) {
      headers.push(name, value);
      continue;
    }
    switch (act) {
      case Act.Host:
        if (host !== undefined) invalid = 'more than one Host header';
        host = value;
        headers.push(name, value);
        break;
      case Act.ContentLength:
        if (value !== '0') hasBody = true;
        headers.push(name, value);
        break;
      case Act.TransferEncoding:
        hasBody = true;
        break;
      case Act.Connection:
        if (!plainConnection(value)) connection = connection === undefined ? value : `${connection},${value}`;
        break;
      case Act.ForwardedFor:
        forwardedFor = forwardedFor === undefined ? value : `${forwardedFor}, ${value}`;
        break;
      default:
        break;
    }
  }
  return { headers: connection === undefined ? headers : stripConnectionListed(headers, connection, connectionProtected), host, hasBody, invalid, forwardedFor };
}

/** Values the proxy adds to every forwarded request that do not change per request. */
export interface ForwardingConstants {
  /** The port clients connected to, as a string. */
  port: string;
  region: string;
}

/** Appends the proxy's forwarding headers. */
export function addForwarding(headers: string[], clientIp: string, forwardedFor: string | undefined, requestId: string, k: ForwardingConstants): void {
  headers.push(
    'fly-client-ip', clientIp,
    'x-forwarded-for', forwardedFor === undefined ? clientIp : `${forwardedFor}, ${clientIp}`,
    'x-forwarded-proto', 'http',
    'x-forwarded-port', k.port,
    'fly-forwarded-port', k.port,
    'fly-region', k.region,
    'fly-request-id', requestId,
    'via', '1.1 tarmac',
  );
}

const noneProtected: ReadonlySet<string> = new Set(['content-length']);

/** A machine's response headers as a flat string array for `writeHead`, hop-by-hop removed, the proxy's added. */
export function responseHeaders(raw: readonly Buffer[], requestId: string): string[] {
  const out: string[] = [];
  let connection: string | undefined;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!.toString('latin1');
    const lower = name.toLowerCase();
    if (hopByHop.has(lower)) {
      if (lower === 'connection') {
        const value = raw[i + 1]!.toString('latin1');
        if (!plainConnection(value)) connection = connection === undefined ? value : `${connection},${value}`;
      }
      continue;
    }
    out.push(name, raw[i + 1]!.toString('latin1'));
  }
  out.push('fly-request-id', requestId, 'via', '1.1 tarmac');
  return connection === undefined ? out : stripConnectionListed(out, connection, noneProtected);
}

/** True for the Connection values nearly every message carries, which name no other header to remove. */
function plainConnection(value: string): boolean {
  if (value.length !== 10 && value.length !== 5) return false;
  const v = value.toLowerCase();
  return v === 'keep-alive' || v === 'close';
}

/** Removes headers named in a Connection value (the rare path: most clients send only keep-alive or close). */
function stripConnectionListed(headers: string[], connection: string, keep: ReadonlySet<string>): string[] {
  let listed: Set<string> | undefined;
  for (const token of connection.split(',')) {
    const t = token.trim().toLowerCase();
    if (t === '' || t === 'close' || t === 'keep-alive' || hopByHop.has(t) || keep.has(t)) continue;
    (listed ??= new Set()).add(t);
  }
  if (!listed) return headers;
  const out: string[] = [];
  for (let i = 0; i < headers.length; i += 2) {
    if (!listed.has(headers[i]!.toLowerCase())) out.push(headers[i]!, headers[i + 1]!);
  }
  return out;
}

/** The client address as proxies report it: IPv4-mapped IPv6 shown as plain IPv4. */
export function clientAddress(remote: string | undefined): string {
  if (remote === undefined) return '';
  return remote.startsWith('::ffff:') && remote.includes('.') ? remote.slice(7) : remote;
}
