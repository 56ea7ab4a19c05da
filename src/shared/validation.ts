// Input validated at the edge: zod issues turned into one sentence that names every bad field.
import type { z } from 'zod';
import { TarmacError } from './errors.ts';

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
