// HTTP plumbing for the API: JSON bodies with size and type checks, and JSON answers.
import type { IncomingMessage, ServerResponse } from 'node:http';
import { TarmacError } from '../shared/errors.ts';

/** Largest request body accepted. */
export const maxBodyBytes = 1024 * 1024;

/** Reads a JSON body. An empty body is `undefined`; other content types, oversize or malformed bodies throw 4xx. */
export async function readJsonBody(req: IncomingMessage): Promise<unknown> {
  const declared = req.headers['content-length'];
  if (declared !== undefined && Number(declared) > maxBodyBytes) {
    req.resume();
    throw new TarmacError('payload_too_large', `request body is ${declared} bytes; the limit is ${maxBodyBytes} bytes (1 MiB)`);
  }
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > maxBodyBytes) {
      req.resume();
      throw new TarmacError('payload_too_large', `request body is larger than the limit of ${maxBodyBytes} bytes (1 MiB)`);
    }
    chunks.push(chunk);
  }
  if (size === 0) return undefined;
  const type = (req.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
  if (type !== 'application/json' && !type.endsWith('+json')) {
    throw new TarmacError('invalid_argument', `request body must be JSON with content-type application/json (got ${type ? `"${type}"` : 'none'})`);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  if (text.trim() === '') return undefined;
  try {
    return JSON.parse(text) as unknown;
  } catch (e) {
    throw new TarmacError('invalid_argument', `invalid JSON body: ${e instanceof Error ? e.message : String(e)}`);
  }
}

export function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json; charset=utf-8',
    'content-length': Buffer.byteLength(text),
    'cache-control': 'no-store',
    ...headers,
  });
  res.end(text);
}

export function sendError(res: ServerResponse, err: TarmacError, headers: Record<string, string> = {}): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const body: Record<string, string> = { error: err.message, code: err.code };
  const flyStatus = flyErrorStatus[err.code];
  if (flyStatus) body['status'] = flyStatus;
  sendJson(res, err.httpStatus, body, headers);
}

/** Fly's machine-readable `status` in error bodies, where Tarmac has the same failure (fly-go reads it). */
const flyErrorStatus: Partial<Record<TarmacError['code'], string>> = {
  name_taken: 'name_taken',
  no_capacity: 'insufficient_capacity',
};

