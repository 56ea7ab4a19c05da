// The proxy's own error answers: every code it can put in `tarmac-proxy-error`, with its status, in one table.
import { STATUS_CODES, type ServerResponse } from 'node:http';
import type { Http2ServerResponse } from 'node:http2';
import type { Socket } from 'node:net';

/** Diagnostic codes sent in the `tarmac-proxy-error` response header. */
export const proxyErrorStatus = {
  /** The request could not be parsed, or had ambiguous framing/routing headers. */
  bad_request: 400,
  /** The client took too long to send its request. */
  request_timeout: 408,
  /** Request headers exceeded the size limit. */
  headers_too_large: 431,
  /** The Host names no app on this proxy. */
  app_not_found: 404,
  /** The app exists but no started machine has an http service on port 80. */
  no_machine: 503,
  /** Connecting to the app's machines failed (after trying another one when there was one). */
  backend_unreachable: 502,
  /** The machine closed the connection or sent a response the proxy could not read. */
  backend_error: 502,
  /** The machine did not send response headers in time. */
  backend_timeout: 504,
  /** Every machine of the app is at its hard concurrency limit and the request's wait in the queue ran out (or the queue is full). */
  over_capacity: 503,
  /** The proxy is shutting down. */
  shutting_down: 503,
} as const;

export type ProxyErrorCode = keyof typeof proxyErrorStatus;

export const proxyErrorHeader = 'tarmac-proxy-error';

/** Answers a request with a short plain-text error; destroys the connection if the response had already started. */
/** A response the proxy writes: node:http's, or node:http2's compatibility one (HTTP/2 clients of the TLS listener). */
export type AnyResponse = ServerResponse | Http2ServerResponse;

/** writeHead with a flat [name, value, …] array: both response kinds take one (node:http2's types admit only objects). */
export function writeHeadRaw(res: AnyResponse, status: number, headers: string[]): void {
  (res as ServerResponse).writeHead(status, headers);
}

export function sendProxyError(res: AnyResponse, code: ProxyErrorCode, message: string, requestId?: string): void {
  if (res.headersSent || res.destroyed) {
    res.destroy();
    return;
  }
  const body = `${message}\n`;
  const headers = [
    'content-type', 'text/plain; charset=utf-8',
    'content-length', String(Buffer.byteLength(body)),
    'cache-control', 'no-store',
    proxyErrorHeader, code,
  ];
  if (requestId !== undefined) headers.push('fly-request-id', requestId);
  writeHeadRaw(res, proxyErrorStatus[code], headers);
  res.end(body);
}

/** Answers a connection whose request node:http could not parse, then closes it. */
export function sendClientError(socket: Socket, code: ProxyErrorCode, message: string, requestId?: string): void {
  const status = proxyErrorStatus[code];
  const body = `${message}\n`;
  const id = requestId === undefined ? '' : `fly-request-id: ${requestId}\r\n`;
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ''}\r\nconnection: close\r\ncontent-type: text/plain; charset=utf-8\r\n`
    + `content-length: ${Buffer.byteLength(body)}\r\n${proxyErrorHeader}: ${code}\r\n${id}\r\n${body}`,
  );
}
