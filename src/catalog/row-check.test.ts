// The precompiled row checks agree with the zod schemas: valid rows pass as they are, invalid ones fail with zod's issues.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { z } from 'zod';
import { compileRowCheck } from './row-check.ts';
import { hostSchema, machineSpecSchema, machineStatusSchema } from './schemas.ts';
import { spec } from './catalog.case.ts';

const check = compileRowCheck(machineSpecSchema);
const valid = { ...spec('m1', 'web', 'one'), config: { image: 'busybox', env: { PORT: '8080' }, services: [{ protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }] }] } };

test('row check: a valid row is accepted as it is', () => {
  assert.equal(machineSpecSchema.safeParse(valid).success, true);
  const r = check(valid);
  assert.ok(r.success);
  assert.equal(r.data, valid);
});

test('row check: every row zod rejects is rejected, with zod\'s issues', () => {
  const bad: Array<[string, unknown]> = [
    ['unknown key', { ...valid, extra: 1 }],
    ['missing key', { ...valid, name: undefined }],
    ['wrong type', { ...valid, version: '1' }],
    ['not an integer', { ...valid, version: 1.5 }],
    ['bad enum', { ...valid, desired: 'running' }],
    ['empty id', { ...valid, id: '' }],
    ['unknown key deep down', { ...valid, config: { ...valid.config, services: [{ ...valid.config.services[0], bogus: true }] } }],
    ['bad env name', { ...valid, config: { ...valid.config, env: { '1X': 'y' } } }],
    ['port out of range', { ...valid, config: { ...valid.config, services: [{ ...valid.config.services[0], internal_port: 70000 }] } }],
    ['image too long (in code points, as zod counts)', { ...valid, config: { ...valid.config, image: '😀'.repeat(513) } }],
    ['an array', [valid]],
    ['null', null],
  ];
  for (const [what, value] of bad) {
    assert.equal(machineSpecSchema.safeParse(value).success, false, `zod rejects: ${what}`);
    const r = check(value);
    assert.equal(r.success, false, `rejected: ${what}`);
    assert.ok(!r.success && r.error.issues.length > 0, `with zod's issues: ${what}`);
  }
});

test('row check: string lengths are counted as zod counts them, in code points', () => {
  const astral = { ...valid, config: { ...valid.config, image: '😀'.repeat(300) } }; // 600 UTF-16 units, 300 code points
  assert.equal(machineSpecSchema.safeParse(astral).success, true);
  assert.equal(check(astral).success, true);
});

test('row check: other row kinds agree with zod too', () => {
  const status = compileRowCheck(machineStatusSchema);
  const ok = { id: 'm1', app: 'web', state: 'started', instance_id: 'i', restarts: 0, restart_generation: 0, updated_at: 'now' };
  assert.equal(status(ok).success, true);
  assert.equal(status({ ...ok, state: 'sleeping' }).success, false);
  const host = compileRowCheck(hostSchema);
  const h = { id: 'h1', region: 'local', roles: ['worker'], host_number: 1, cpus: 2, memory_mb: 512, address: '::1', updated_at: 'now' };
  assert.equal(host(h).success, true);
  assert.equal(host({ ...h, roles: ['boss'] }).success, false);
  assert.equal(host({ ...h, cpus: -1 }).success, false);
});

test('row check: a schema with a default or a transform is left to zod, which fills it in', () => {
  const withDefault = compileRowCheck(z.strictObject({ a: z.string(), b: z.number().default(7) }));
  assert.deepEqual(withDefault({ a: 'x' }), { success: true, data: { a: 'x', b: 7 } });
  const transformed = compileRowCheck(z.strictObject({ a: z.string().transform((s) => s.length) }));
  assert.deepEqual(transformed({ a: 'abc' }), { success: true, data: { a: 3 } });
});
