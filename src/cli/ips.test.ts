// `tarmac ips allocate-v4|allocate-v6|list|release` in this process against a real API over a temp SQLite catalog.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { parseCidr, type IpRange } from '../shared/ip-pool.ts';
import { parseCommandLine } from './args.ts';
import { cliAgainstApi, type CliResult } from './testing.ts';

async function setup(t: TestContext): Promise<(args: string[]) => Promise<CliResult>> {
  const ipPool = { v4: [parseCidr('127.0.9.0/24') as IpRange], v6: [] };
  return (await cliAgainstApi(t, 'db', { ipPool })).run;
}

test('ips commands parse: allocate takes --region, release needs the address, every one needs --app', () => {
  const v4 = parseCommandLine(['ips', 'allocate-v4', '-a', 'db', '--region', 'ams']);
  assert.ok(v4.kind === 'run' && v4.command.name === 'ips allocate-v4' && v4.command.region === 'ams');
  const ls = parseCommandLine(['ip', 'ls', '-a', 'db']);
  assert.ok(ls.kind === 'run' && ls.command.name === 'ips list');
  assert.throws(() => parseCommandLine(['ips', 'release', '-a', 'db']), /ADDRESS/);
  assert.throws(() => parseCommandLine(['ips', 'list']), /missing --app/);
});

test('tarmac ips allocate-v4, list and release; --json gives the API\'s documents; errors name the field', async (t) => {
  const run = await setup(t);
  const allocated = await run(['ips', 'allocate-v4', '-a', 'db']);
  assert.equal(allocated.code, 0, allocated.stderr);
  assert.equal(allocated.stdout, 'Allocated 127.0.9.1 to app db\n');
  const json = await run(['--json', 'ips', 'allocate-v4', '-a', 'db', '--region', 'ams']);
  assert.equal(json.code, 0, json.stderr);
  assert.deepEqual({ ...JSON.parse(json.stdout), created_at: 'x' }, { ip: '127.0.9.2', type: 'v4', region: 'ams', shared: false, service_name: '', created_at: 'x' });

  const list = await run(['ips', 'list', '-a', 'db']);
  assert.equal(list.code, 0, list.stderr);
  assert.match(list.stdout, /VERSION\s+IP\s+TYPE\s+REGION\s+CREATED/i);
  assert.match(list.stdout, /v4\s+127\.0\.9\.1\s+dedicated\s+global/);
  assert.match(list.stdout, /v4\s+127\.0\.9\.2\s+dedicated\s+ams/);
  const listed = await run(['ips', 'list', '-a', 'db', '--json']);
  assert.deepEqual(JSON.parse(listed.stdout).ips.map((x: { ip: string }) => x.ip), ['127.0.9.1', '127.0.9.2']);

  const released = await run(['ips', 'release', '127.0.9.1', '-a', 'db']);
  assert.equal(released.code, 0, released.stderr);
  assert.equal(released.stdout, 'Released 127.0.9.1 from app db\n');
  const again = await run(['ips', 'release', '127.0.9.1', '-a', 'db']);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /app "db" has no address 127\.0\.9\.1/);
  const v6 = await run(['ips', 'allocate-v6', '-a', 'db']);
  assert.equal(v6.code, 1);
  assert.match(v6.stderr, /type: this fleet has no IPv6 pool/);
  const empty = await run(['ips', 'release', '127.0.9.2', '-a', 'db']);
  assert.equal(empty.code, 0, empty.stderr);
  assert.match((await run(['ips', 'list', '-a', 'db'])).stdout, /^No addresses: allocate one with 'tarmac ips allocate-v4 -a db'/);
});
