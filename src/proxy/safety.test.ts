// A corpus of malformed and hostile requests over raw sockets: each gets a 4xx or a closed connection, nothing ambiguous reaches the machine.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { connect, createServer, type AddressInfo, type Socket } from 'node:net';
import { waitFor } from '../../test/helpers/wait.ts';
import type { RunningProxy } from './proxy.ts';
import { createApp, httpService, proxyEngines, proxyOn, startedMachine, tempCatalog } from './testing.ts';

/** One request as the raw machine parsed it, with everything that made it ambiguous or malformed. */
interface Received { requestLine: string; headers: Array<[string, string]>; body: Buffer; problems: string[] }

const token = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

/**
 * A raw TCP "machine" with a deliberately strict HTTP/1.1 parser: it records exactly what arrived and flags anything a
 * lenient or differently-lenient server could read another way (two framings, folded lines, odd names, stray CR/LF).
 */
async function rawMachine(t: TestContext): Promise<{ port: number; received: Received[]; bytes(): number }> {
  const received: Received[] = [];
  let total = 0;
  const sockets = new Set<Socket>();
  const server = createServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => s.destroy());
    let buf = Buffer.alloc(0);
    s.on('data', (d: Buffer) => {
      total += d.length;
      buf = Buffer.concat([buf, d]);
      for (;;) {
        const parsed = parseOne(buf);
        if (parsed === undefined) return;
        received.push(parsed.request);
        buf = buf.subarray(parsed.used);
        s.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok');
        if (parsed.request.problems.length > 0) {
          s.destroy();
          return;
        }
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => {
    for (const s of sockets) s.destroy();
    server.close(() => resolve());
  }));
  return { port: (server.address() as AddressInfo).port, received, bytes: () => total };
}

/** Parses one request from `buf`, or undefined when more bytes are needed. */
function parseOne(buf: Buffer): { request: Received; used: number } | undefined {
  const end = buf.indexOf('\r\n\r\n');
  if (end === -1) return undefined;
  const lines = buf.subarray(0, end).toString('latin1').split('\r\n');
  const problems: string[] = [];
  const requestLine = lines[0] ?? '';
  if (!/^[A-Z]+ \/[!-~]* HTTP\/1\.1$/.test(requestLine)) problems.push(`request line ${JSON.stringify(requestLine)}`);
  const headers: Array<[string, string]> = [];
  for (const line of lines.slice(1)) {
    if (/[\r\n\0]/.test(line)) problems.push(`stray CR, LF or NUL in ${JSON.stringify(line)}`);
    if (line.startsWith(' ') || line.startsWith('\t')) problems.push(`folded line ${JSON.stringify(line)}`);
    const colon = line.indexOf(':');
    const name = colon === -1 ? line : line.slice(0, colon);
    if (!token.test(name)) problems.push(`header name ${JSON.stringify(name)}`);
    headers.push([name.toLowerCase(), line.slice(colon + 1).trim()]);
  }
  const all = (n: string) => headers.filter(([k]) => k === n).map(([, v]) => v);
  const cl = all('content-length');
  const te = all('transfer-encoding');
  if (all('host').length !== 1) problems.push(`${all('host').length} Host headers`);
  if (cl.length > 1) problems.push('several Content-Length headers');
  if (te.length > 1) problems.push('several Transfer-Encoding headers');
  if (cl.length > 0 && te.length > 0) problems.push('both Content-Length and Transfer-Encoding');
  if (cl.length === 1 && !/^[0-9]+$/.test(cl[0]!)) problems.push(`Content-Length ${JSON.stringify(cl[0])}`);
  if (te.length === 1 && te[0]!.toLowerCase() !== 'chunked') problems.push(`Transfer-Encoding ${JSON.stringify(te[0])}`);
  let pos = end + 4;
  let body: Buffer = Buffer.alloc(0);
  if (problems.length === 0 && te.length === 1) {
    const parts: Buffer[] = [];
    for (;;) {
      const eol = buf.indexOf('\r\n', pos);
      if (eol === -1) return undefined;
      const sizeLine = buf.subarray(pos, eol).toString('latin1');
      if (!/^[0-9a-fA-F]+$/.test(sizeLine)) {
        problems.push(`chunk size ${JSON.stringify(sizeLine)}`);
        break;
      }
      const size = parseInt(sizeLine, 16);
      if (size === 0) {
        if (buf.length < eol + 4) return undefined;
        if (buf.subarray(eol + 2, eol + 4).toString('latin1') !== '\r\n') problems.push('trailers after the last chunk');
        pos = eol + 4;
        break;
      }
      if (buf.length < eol + 2 + size + 2) return undefined;
      parts.push(buf.subarray(eol + 2, eol + 2 + size));
      if (buf.subarray(eol + 2 + size, eol + 4 + size).toString('latin1') !== '\r\n') problems.push('chunk without CRLF');
      pos = eol + 4 + size;
    }
    body = Buffer.concat(parts);
  } else if (problems.length === 0 && cl.length === 1) {
    const n = Number(cl[0]);
    if (buf.length < pos + n) return undefined;
    body = buf.subarray(pos, pos + n);
    pos += n;
  }
  return { request: { requestLine, headers, body: Buffer.from(body), problems }, used: pos };
}

interface Answer { status: number; code: string | undefined; closed: boolean }

/**
 * Sends raw bytes on a fresh connection (optionally more bytes later, a drip at a time) and reads the first response,
 * or notes that the proxy closed the connection without one.
 */
function send(proxy: RunningProxy, data: string | string[], dripMs = 0): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const s = connect(proxy.address.port, '127.0.0.1');
    let out = Buffer.alloc(0);
    let timer: NodeJS.Timeout | undefined;
    const finish = (a: Answer) => {
      clearTimeout(timer);
      s.destroy();
      resolve(a);
    };
    s.on('data', (d: Buffer) => {
      out = Buffer.concat([out, d]);
      const end = out.indexOf('\r\n\r\n');
      if (end === -1) return;
      const head = out.subarray(0, end).toString('latin1');
      const len = /\r\ncontent-length: *([0-9]+)/i.exec(head);
      if (len !== null && out.length < end + 4 + Number(len[1])) return;
      finish({ status: Number(head.slice(9, 12)), code: /\r\ntarmac-proxy-error: *([a-z_]+)/i.exec(head)?.[1], closed: false });
    });
    s.on('close', () => finish({ status: 0, code: undefined, closed: true }));
    s.on('error', () => undefined);
    s.setTimeout(20_000, () => {
      s.destroy();
      reject(new Error(`no answer to ${JSON.stringify(data).slice(0, 200)}`));
    });
    const pieces = typeof data === 'string' ? [data] : [...data];
    const drip = () => {
      const p = pieces.shift();
      if (p === undefined || s.destroyed) return;
      s.write(p);
      if (dripMs > 0) timer = setTimeout(drip, dripMs);
      else drip();
    };
    drip();
  });
}

const H = 'Host: app.localhost';

/** Requests that must never be forwarded: each is refused with a 4xx or a closed connection. */
const hostile: Array<[string, string]> = [
  ['Content-Length with Transfer-Encoding', `POST / HTTP/1.1\r\n${H}\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n${H}\r\n\r\n`],
  ['Transfer-Encoding with Content-Length', `POST / HTTP/1.1\r\n${H}\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n`],
  ['two differing Content-Length headers', `POST / HTTP/1.1\r\n${H}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!`],
  ['two identical Content-Length headers', `POST / HTTP/1.1\r\n${H}\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello`],
  ['a Content-Length list', `POST / HTTP/1.1\r\n${H}\r\nContent-Length: 5, 6\r\n\r\nhello!`],
  ['a signed Content-Length', `POST / HTTP/1.1\r\n${H}\r\nContent-Length: +5\r\n\r\nhello`],
  ['a hex Content-Length', `POST / HTTP/1.1\r\n${H}\r\nContent-Length: 0x5\r\n\r\nhello`],
  ['chunked not the last transfer coding', `POST / HTTP/1.1\r\n${H}\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n`],
  ['an unknown transfer coding', `POST / HTTP/1.1\r\n${H}\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n`],
  ['space before the colon of Transfer-Encoding', `POST / HTTP/1.1\r\n${H}\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n`],
  ['obs-fold in a header', `GET / HTTP/1.1\r\n${H}\r\nX-Folded: a\r\n b\r\n\r\n`],
  ['obs-fold in Transfer-Encoding', `POST / HTTP/1.1\r\n${H}\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n`],
  ['a space in a header name', `GET / HTTP/1.1\r\n${H}\r\nX Bad: 1\r\n\r\n`],
  ['a separator in a header name', `GET / HTTP/1.1\r\n${H}\r\nX-Bad@: 1\r\n\r\n`],
  ['an empty header name', `GET / HTTP/1.1\r\n${H}\r\n: 1\r\n\r\n`],
  ['NUL in a header value', `GET / HTTP/1.1\r\n${H}\r\nX-Nul: a\0b\r\n\r\n`],
  ['bare CR in a header value', `GET / HTTP/1.1\r\n${H}\r\nX-Cr: a\rb\r\n\r\n`],
  ['headers over the size limit', `GET / HTTP/1.1\r\n${H}\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`],
  ['a request line over the size limit', `GET /${'a'.repeat(20_000)} HTTP/1.1\r\n${H}\r\n\r\n`],
  ['more header fields than the limit', `GET / HTTP/1.1\r\n${H}\r\n${Array.from({ length: 150 }, (_, i) => `X-H${i}: v\r\n`).join('')}\r\n`],
  ['no Host', 'GET / HTTP/1.1\r\nX-A: 1\r\n\r\n'],
  ['two Host headers', `GET / HTTP/1.1\r\n${H}\r\nHost: other.localhost\r\n\r\n`],
  ['a Host with a path', 'GET / HTTP/1.1\r\nHost: app.localhost/evil\r\n\r\n'],
  ['a Host with a space', 'GET / HTTP/1.1\r\nHost: app.localhost evil\r\n\r\n'],
  ['a Host with userinfo', 'GET / HTTP/1.1\r\nHost: evil@app.localhost\r\n\r\n'],
  ['an absolute-form target for another host', `GET http://other.localhost/x HTTP/1.1\r\n${H}\r\n\r\n`],
  ['an absolute-form target with userinfo', `GET http://evil@app.localhost/x HTTP/1.1\r\n${H}\r\n\r\n`],
  ['an asterisk-form target', `OPTIONS * HTTP/1.1\r\n${H}\r\n\r\n`],
  ['an authority-form target (CONNECT)', `CONNECT app.localhost:80 HTTP/1.1\r\n${H}\r\n\r\n`],
  ['an invalid chunk size', `POST / HTTP/1.1\r\n${H}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n`],
  ['a garbage request line', 'GARBAGE\r\n\r\n'],
  ['binary noise', '\x00\x01\x02\x03\xff\xfe\r\n\r\n'],
  ['an unknown HTTP version', `GET / HTTP/9.9\r\n${H}\r\n\r\n`],
  ['a lowercase method', `get / HTTP/1.1\r\n${H}\r\n\r\n`],
  ['a space in the target', `GET /a b HTTP/1.1\r\n${H}\r\n\r\n`],
];

/** Hostile requests HAProxy (the data plane) normalizes as the RFCs allow instead of refusing them. */
const normalizedByHaproxy: ReadonlySet<string> = new Set([
  'Content-Length with Transfer-Encoding', 'Transfer-Encoding with Content-Length', 'two identical Content-Length headers',
  // RFC 9112 §5.2: obs-fold replaced by spaces before the message goes on.
  'obs-fold in a header', 'obs-fold in Transfer-Encoding',
]);

/** Unusual but well-defined requests: each is forwarded in exactly one form, with the body the client framed. */
const accepted: Array<[string, string, { line: string; body: string }]> = [
  ['an absolute-form target for the same host', `GET http://app.localhost/abs?q=1 HTTP/1.1\r\n${H}\r\nConnection: close\r\n\r\n`, { line: 'GET /abs?q=1 HTTP/1.1', body: '' }],
  ['a chunked body with an extension', `POST /chunked HTTP/1.1\r\n${H}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;ext=1\r\nhello\r\n0\r\n\r\n`, { line: 'POST /chunked HTTP/1.1', body: 'hello' }],
  // node:http's parser skips the extra space; what it forwards is the one request it read, in canonical form.
  ['two spaces in the request line', `GET  /spaces HTTP/1.1\r\n${H}\r\nConnection: close\r\n\r\n`, { line: 'GET /spaces HTTP/1.1', body: '' }],
  ['a header value with obs-text bytes', `GET /latin HTTP/1.1\r\n${H}\r\nX-Latin: caf\xe9\r\nConnection: close\r\n\r\n`, { line: 'GET /latin HTTP/1.1', body: '' }],
];

for (const engine of proxyEngines) {
test(`${engine}: hostile requests get a 4xx or a closed connection and never reach the machine; the proxy keeps serving`, async (t) => {
  const c = await tempCatalog(t);
  await createApp(c, 'app');
  const machine = await rawMachine(t);
  await startedMachine(c, 'app', httpService(machine.port));
  const proxy = await proxyOn(engine, t, c, { clientHeadersMs: 1_000, clientRequestMs: 2_000 });

  for (const [what, data] of hostile) {
    const before = machine.bytes();
    const count = machine.received.length;
    const a = await send(proxy, data);
    if (engine === 'haproxy' && normalizedByHaproxy.has(what)) {
      // RFC 9112 §6.1 lets a server take Transfer-Encoding over Content-Length (and close after answering), RFC 9110
      // §8.6 merge identical Content-Length values: HAProxy does both, so the machine gets one request with one
      // framing, and never what followed it.
      assert.equal(machine.received.length, count + 1, `${what}: forwarded once`);
      assert.deepEqual(machine.received.at(-1)!.problems, [], what);
      continue;
    }
    assert.ok(a.closed || (a.status >= 400 && a.status < 500), `${what}: answered ${a.status}`);
    assert.equal(machine.bytes(), before, `${what}: bytes reached the machine`);
  }
  assert.ok(!machine.received.some((r) => r.requestLine.includes('/smuggled')), 'a smuggled request reached the machine');

  // Pipelined behind a good request on one connection: the good one is served, the smuggling attempt is refused.
  const pipelined = await new Promise<string>((resolve) => {
    const s = connect(proxy.address.port, '127.0.0.1');
    let out = '';
    s.setEncoding('latin1');
    s.on('data', (d: string) => { out += d; });
    s.on('close', () => resolve(out));
    s.write(`GET /first HTTP/1.1\r\n${H}\r\n\r\nPOST / HTTP/1.1\r\n${H}\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG`);
  });
  if (engine === 'haproxy') {
    // HAProxy takes the second request by its Transfer-Encoding (see normalizedByHaproxy) and closes after it.
    assert.match(pipelined, /^HTTP\/1\.1 200 OK\r\n(?:(?!HTTP\/1\.1)[^])*HTTP\/1\.1 200 OK\r\n(?:(?!HTTP\/1\.1)[^])*$/);
    assert.deepEqual(machine.received.slice(-2).map((r) => r.requestLine), ['GET /first HTTP/1.1', 'POST / HTTP/1.1']);
  } else {
    // The good request's answer comes first and is the only one: the connection closes after it.
    assert.match(pipelined, /^HTTP\/1\.1 200 OK\r\n(?:(?!HTTP\/1\.1)[^])*$/);
    assert.deepEqual(machine.received.map((r) => r.requestLine), ['GET /first HTTP/1.1']);
  }

  for (const [what, data, want] of accepted) {
    const count = machine.received.length;
    const a = await send(proxy, data);
    assert.equal(a.status, 200, `${what}: answered ${a.status}`);
    assert.equal(machine.received.length, count + 1, `${what}: forwarded once`);
    const got = machine.received.at(-1)!;
    assert.equal(got.requestLine, want.line, what);
    assert.equal(got.body.toString('latin1'), want.body, what);
  }

  for (const r of machine.received) assert.deepEqual(r.problems, [], `ambiguous request reached the machine: ${r.requestLine}`);

  const after = await send(proxy, `GET /after HTTP/1.1\r\n${H}\r\nConnection: close\r\n\r\n`);
  assert.equal(after.status, 200);
  assert.equal(machine.received.at(-1)?.requestLine, 'GET /after HTTP/1.1');
});

test(`${engine}: slow clients are cut by the headers timeout: a stalled head and a drip-fed one`, async (t) => {
  const c = await tempCatalog(t);
  await createApp(c, 'app');
  const machine = await rawMachine(t);
  await startedMachine(c, 'app', httpService(machine.port));
  const proxy = await proxyOn(engine, t, c, { clientHeadersMs: 300, clientRequestMs: 600 });

  const stalled = await send(proxy, `GET / HTTP/1.1\r\n${H}\r\n`);
  assert.ok(stalled.closed || stalled.status === 408, `stalled: answered ${stalled.status}`);
  // One header line every 50 ms, forever (the drip runs out after 1,000 lines, far past the timeout).
  const lines = ['GET / HTTP/1.1\r\n', `${H}\r\n`, ...Array.from({ length: 1_000 }, (_, i) => `X-Drip-${i}: 1\r\n`)];
  const dripped = await send(proxy, lines, 50);
  assert.ok(dripped.closed || dripped.status === 408, `drip: answered ${dripped.status}`);
  assert.equal(machine.received.length, 0);

  await waitFor('a normal request to be served after the slow ones', async () => (await send(proxy, `GET / HTTP/1.1\r\n${H}\r\nConnection: close\r\n\r\n`)).status === 200);
});
}
