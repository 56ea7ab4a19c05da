// HTTP plumbing for the API: JSON bodies with size and type checks, JSON answers, and zod issues as field-named errors.
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { z } from 'zod';
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

/** "config.services[0].ports[1].port" from a zod issue path. */
export function issuePath(path: ReadonlyArray<PropertyKey>, prefix = ''): string {
  let out = prefix;
  for (const p of path) {
    if (typeof p === 'number') out += `[${p}]`;
    else out += out ? `.${String(p)}` : String(p);
  }
  return out;
}

/** One sentence listing every problem, each naming its field. */
export function describeIssues(error: z.ZodError, prefix = ''): string {
  const parts: string[] = [];
  for (const issue of error.issues) {
    const at = issuePath(issue.path, prefix);
    if (issue.code === 'unrecognized_keys') {
      for (const key of issue.keys) parts.push(`${at ? `${at}.` : ''}${key}: unknown field`);
    } else {
      const missing = (issue.code === 'invalid_type' || issue.code === 'invalid_value' || issue.code === 'invalid_union') && (issue as { input?: unknown }).input === undefined;
      parts.push(`${at || 'body'}: ${missing ? 'required' : issueText(issue)}`);
    }
  }
  return parts.join('; ');
}

function issueText(issue: z.core.$ZodIssue): string {
  switch (issue.code) {
    case 'invalid_type':
    {
      const received = /received (\w+)$/.exec(issue.message)?.[1];
      if (received === 'undefined') return 'required';
      return `must be ${article(issue.expected)}${received ? `, got ${received}` : ''}`;
    }
    case 'too_small': {
      const min = String(issue.minimum);
      if (issue.origin === 'number' || issue.origin === 'int' || issue.origin === 'bigint') return `must be ${issue.inclusive ? '≥' : '>'} ${min}`;
      if (issue.origin === 'string') return `must be at least ${min} characters long`;
      if (issue.origin === 'array') return `must have at least ${min} items`;
      return issue.message;
    }
    case 'too_big': {
      const max = String(issue.maximum);
      if (issue.origin === 'number' || issue.origin === 'int' || issue.origin === 'bigint') return `must be ${issue.inclusive ? '≤' : '<'} ${max}`;
      if (issue.origin === 'string') return `must be at most ${max} characters long`;
      if (issue.origin === 'array') return `must have at most ${max} items`;
      return issue.message;
    }
    case 'invalid_value':
      return `must be one of ${issue.values.map((v) => JSON.stringify(v)).join(', ')}`;
    case 'invalid_key':
      return issue.issues[0] ? `key ${issue.issues[0].message}` : 'invalid key';
    default:
      return issue.message;
  }
}

function article(type: string): string {
  return /^[aeiou]/.test(type) ? `an ${type}` : `a ${type}`;
}

/** Parses `input` with `schema`, or throws 400 naming every bad field. */
export function parseInput<S extends z.ZodType>(schema: S, input: unknown, prefix = ''): z.output<S> {
  // reportInput: a present value carries `input` (JSON has no undefined), so a missing one can be called required.
  const result = schema.safeParse(input, { reportInput: true });
  if (!result.success) throw new TarmacError('invalid_argument', describeIssues(result.error, prefix));
  return result.data;
}
