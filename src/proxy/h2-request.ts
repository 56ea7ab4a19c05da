// HTTP/2 client requests read like HTTP/1.1 ones: pseudo-headers dropped (:authority becomes Host), cookies joined, the body known from END_STREAM.
import type { Http2ServerRequest } from 'node:http2';
import { readRequestHead, type RequestHead } from './headers.ts';

/** The request head of an HTTP/2 request, in the shape the HTTP/1.1 path forwards (`backhaul`: see readRequestHead). */
export function h2RequestHead(req: Http2ServerRequest, backhaul = false): RequestHead {
  const raw = req.rawHeaders;
  const plain: string[] = [];
  let authority: string | undefined;
  let hasHost = false;
  let cookie: string | undefined;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!;
    const value = raw[i + 1]!;
    if (name.charCodeAt(0) === 58 /* : */) {
      if (name === ':authority') authority = value;
      continue;
    }
    if (name === 'cookie') {
      // HTTP/2 may split cookies into several fields; HTTP/1.1 wants one (RFC 9113 §8.2.3).
      cookie = cookie === undefined ? value : `${cookie}; ${value}`;
      continue;
    }
    if (name === 'host') hasHost = true;
    plain.push(name, value);
  }
  if (!hasHost && authority !== undefined) plain.push('host', authority);
  if (cookie !== undefined) plain.push('cookie', cookie);
  const head = readRequestHead(plain, backhaul);
  // HTTP/2 has no chunked encoding: a body is whatever follows headers that did not end the stream.
  head.hasBody = !req.stream.endAfterHeaders;
  return head;
}
