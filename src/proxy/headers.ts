// Header rewriting on the hot path: hop-by-hop stripping and the Fly-style forwarding headers, on flat arrays.

/** Hop-by-hop headers (RFC 9110 §7.6.1 plus the legacy ones); never forwarded in either direction. */
export const hopByHop: ReadonlySet<string> = new Set([
  'connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade',
]);

/** What the request loop does with a header, by lowercase name; names not listed pass through untouched. */
const Act = {
  Hop: 1, Connection: 2, TransferEncoding: 3, Host: 4, ContentLength: 5, ForwardedFor: 6, Drop: 7, ForceInstance: 8, PreferRegion: 9,
  RequestId: 10, Front: 11, FrontClient: 12,
} as const;
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
  // Set only by the proxy on a replayed request (where it was replayed from): a machine must be able to trust it.
  ['fly-replay-src', Act.Drop],
  // node:http answers `Expect: 100-continue` itself; undici refuses to forward it.
  ['expect', Act.Drop],
  // Routing requests to the proxy (Fly's); read, not forwarded.
  ['fly-force-instance-id', Act.ForceInstance],
  ['fly-prefer-region', Act.PreferRegion],
  // From the HAProxy data plane in front of this proxy (its key and the client's address); never forwarded, and the
  // address is believed only with the right key (see `frontClientOf`).
  ['tarmac-front', Act.Front],
  ['tarmac-client-ip', Act.FrontClient],
]);

/**
 * The same for requests arriving over the backhaul from another host's proxy, which set the forwarding headers
 * already: those pass through, its request id is kept, and Fly-Force-Instance-Id names the machine it picked.
 */
const backhaulActs = new Map<string, Act>([...requestActs].filter(([name, act]) => act !== Act.Drop || name === 'expect'));
backhaulActs.set('fly-request-id', Act.RequestId);

/** Lengths of the request header names in those maps: a name of another length passes through without being lowercased. */
const requestActLength = new Uint8Array(32);
for (const name of requestActs.keys()) requestActLength[name.length] = 1;

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
  /** Fly-Force-Instance-Id: the only machine that may serve the request. */
  forceInstance: string | undefined;
  /** Fly-Prefer-Region: serve from this region when it has a machine below its limits. */
  preferRegion: string | undefined;
  /** Fly-Request-Id set by the proxy that sent a backhaul request. */
  requestId: string | undefined;
  /** `tarmac-front`: the key the HAProxy data plane sends (see `frontClientOf`). */
  front: string | undefined;
  /** `tarmac-client-ip`: the client's address as the HAProxy data plane saw it. */
  frontClient: string | undefined;
}

/**
 * Splits `rawHeaders` into what to forward and what the proxy acts on. One pass, one output array. `backhaul` reads a
 * request another host's proxy forwarded (its forwarding headers are trusted and kept).
 */
export function readRequestHead(raw: readonly string[], backhaul = false): RequestHead {
  const acts = backhaul ? backhaulActs : requestActs;
  const headers: string[] = [];
  let host: string | undefined;
  let forceInstance: string | undefined;
  let preferRegion: string | undefined;
  let requestId: string | undefined;
  let front: string | undefined;
  let frontClient: string | undefined;
  let hasBody = false;
  let invalid: string | undefined;
  let forwardedFor: string | undefined;
  let connection: string | undefined;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!;
    const value = raw[i + 1]!;
    const act = name.length < requestActLength.length && requestActLength[name.length] === 1 ? acts.get(name.toLowerCase()) : undefined;
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
        if (backhaul) headers.push(name, value);
        else forwardedFor = forwardedFor === undefined ? value : `${forwardedFor}, ${value}`;
        break;
      case Act.ForceInstance:
        if (forceInstance !== undefined && forceInstance !== value) invalid = 'more than one Fly-Force-Instance-Id header';
        forceInstance = value.trim();
        break;
      case Act.PreferRegion:
        preferRegion = value.trim().toLowerCase();
        break;
      case Act.RequestId:
        requestId = value;
        headers.push(name, value);
        break;
      case Act.Front:
        front = value;
        break;
      case Act.FrontClient:
        frontClient = value;
        break;
      default:
        break;
    }
  }
  return {
    headers: connection === undefined ? headers : stripConnectionListed(headers, connection, connectionProtected),
    host, hasBody, invalid, forwardedFor, forceInstance, preferRegion, requestId, front, frontClient,
  };
}

/** Values the proxy adds to every forwarded request that do not change per request. */
export interface ForwardingConstants {
  /** The port clients connected to, as a string. */
  port: string;
  region: string;
  /** The scheme clients used: 'http', or 'https' on the TLS listener. */
  proto: 'http' | 'https';
}

/** Appends the proxy's forwarding headers. */
export function addForwarding(headers: string[], clientIp: string, forwardedFor: string | undefined, requestId: string, k: ForwardingConstants): void {
  headers.push(
    'fly-client-ip', clientIp,
    'x-forwarded-for', forwardedFor === undefined ? clientIp : `${forwardedFor}, ${clientIp}`,
    'x-forwarded-proto', k.proto,
    'x-forwarded-port', k.port,
    'fly-forwarded-port', k.port,
    'fly-region', k.region,
    'fly-request-id', requestId,
    'via', '1.1 tarmac',
  );
}

const noneProtected: ReadonlySet<string> = new Set(['content-length']);

/**
 * Lengths of the response header names the proxy acts on (fly-request-id, fly-replay and the hop-by-hop ones): any
 * other name passes through without being lowercased, which spares a string per header for most responses.
 */
const actedOnLength = new Uint8Array(32);
for (const name of ['fly-request-id', 'fly-replay', ...hopByHop]) actedOnLength[name.length] = 1;

/**
 * A machine's response headers as a flat string array for `writeHead`, hop-by-hop removed, the proxy's added. With
 * `replay`, a `fly-replay` header is taken out into it (the proxy replays the request instead of relaying this).
 */
export function responseHeaders(raw: readonly Buffer[], requestId: string, replay?: { value: string | undefined }): string[] {
  const out: string[] = [];
  let connection: string | undefined;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!.toString('latin1');
    if (name.length < actedOnLength.length && actedOnLength[name.length] === 1) {
      const lower = name.toLowerCase();
      if (lower === 'fly-request-id') continue; // the proxy's own id is added below (a backhaul hop sends the same one)
      if (lower === 'fly-replay') {
        if (replay === undefined) out.push(name, raw[i + 1]!.toString('latin1'));
        else replay.value = raw[i + 1]!.toString('latin1'); // acted on by the proxy, not relayed
        continue;
      }
      if (hopByHop.has(lower)) {
        if (lower === 'connection') {
          const value = raw[i + 1]!.toString('latin1');
          if (!plainConnection(value)) connection = connection === undefined ? value : `${connection},${value}`;
        }
        continue;
      }
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
  return listed ? withoutHeaders(headers, listed) : headers;
}

/** A flat [name, value, …] header array without the fields whose lowercase name is in `names`. */
export function withoutHeaders(headers: readonly string[], names: ReadonlySet<string>): string[] {
  const out: string[] = [];
  for (let i = 0; i < headers.length; i += 2) {
    if (!names.has(headers[i]!.toLowerCase())) out.push(headers[i]!, headers[i + 1]!);
  }
  return out;
}

/** The client address as proxies report it: IPv4-mapped IPv6 shown as plain IPv4. */
export function clientAddress(remote: string | undefined): string {
  if (remote === undefined) return '';
  return remote.startsWith('::ffff:') && remote.includes('.') ? remote.slice(7) : remote;
}
