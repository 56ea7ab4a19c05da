// Every error code is documented in docs/errors.md with its HTTP status.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { errorStatus, TarmacError } from './errors.ts';

test('every error code is documented with its status', async () => {
  const doc = await readFile(new URL('../../docs/errors.md', import.meta.url), 'utf8');
  for (const [code, status] of Object.entries(errorStatus)) {
    assert.match(doc, new RegExp(`\\| \`${code}\` \\| ${status} \\|`), `docs/errors.md documents ${code} as ${status}`);
  }
  assert.equal(new TarmacError('name_taken', 'x').httpStatus, 409);
});
