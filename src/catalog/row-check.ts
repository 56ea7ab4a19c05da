// Precompiled checks of catalog rows read back from etcd: ajv code generated from the zod schemas, zod for the message.
import { Ajv2020 } from 'ajv/dist/2020.js';
import { z } from 'zod';

/** The result shape of zod's `safeParse`. */
export type RowCheckResult<T> = ReturnType<z.ZodType<T>['safeParse']>;
export type RowCheck<T> = (value: unknown) => RowCheckResult<T>;

// String lengths in code points (ajv's default, and zod's) and regexps without the `u` flag, as zod matches them.
const ajv = new Ajv2020({ unicodeRegExp: false, allErrors: false, strict: false, validateSchema: false });

/**
 * A check with the meaning of `schema.safeParse` for a parsed JSON value, 4-6x faster on valid rows: the zod schema is
 * turned into JSON Schema and compiled by ajv once. ajv only ever accepts: a value it passes is returned as it is (so
 * only schemas whose input and output agree, without defaults or transforms, are compiled), and a value it rejects goes
 * through zod, whose verdict and message stand. So ajv must be at least as strict as zod (row-check.test.ts holds it to
 * that); a schema that JSON Schema cannot express is checked by zod alone.
 */
export function compileRowCheck<S extends z.ZodType>(schema: S): RowCheck<z.output<S>> {
  let valid: ((v: unknown) => boolean) | undefined;
  try {
    const output = z.toJSONSchema(schema, { io: 'output', unrepresentable: 'throw' });
    const input = z.toJSONSchema(schema, { io: 'input', unrepresentable: 'throw' });
    valid = JSON.stringify(input) === JSON.stringify(output) ? ajv.compile(output) : undefined;
  } catch {
    valid = undefined;
  }
  if (!valid) return (value) => schema.safeParse(value);
  const fast = valid;
  return (value) => (fast(value) ? { success: true, data: value as z.output<S> } : schema.safeParse(value));
}

/** One precompiled check per schema of a map of schemas. */
export function compileRowChecks<M extends Record<string, z.ZodType>>(schemas: M): { [K in keyof M]: RowCheck<z.output<M[K]>> } {
  return Object.fromEntries(Object.entries(schemas).map(([k, s]) => [k, compileRowCheck(s)])) as { [K in keyof M]: RowCheck<z.output<M[K]>> };
}
