// Tests of the `tarmac` CLI: pure parsing and formatting, then the real binary against a real API server.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { appendFile, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  buildCreateRequest, parseCommandLine, parseEnvPairs, parsePortSpec, portsToServices, splitCommand, UsageError, type Command,
} from './args.ts';
import { resolveApiConfig } from './config.ts';
import { ago, eventDetail, servicesLabel, table, visibleLength } from './format.ts';
import type { MachineResponse } from '../client/index.ts';

function run(argv: string[], env: Record<string, string> = {}): { command: Command; global: unknown } {
  const r = parseCommandLine(argv, env);
  assert.equal(r.kind, 'run', `expected a command for ${argv.join(' ')}`);
  if (r.kind !== 'run') throw new Error('unreachable');
  return { command: r.command, global: r.global };
}

function usageError(argv: string[], pattern: RegExp): void {
  assert.throws(() => parseCommandLine(argv, {}), (e: unknown) => {
    assert.ok(e instanceof UsageError, `expected UsageError for ${argv.join(' ')}, got ${String(e)}`);
    assert.match(e.message, pattern);
    assert.ok(!e.message.includes('\n'), 'usage errors are one line');
    assert.match(e.message, /See 'tarmac .*--help'\.$/, 'usage errors point to --help');
    return true;
  });
}

describe('parsing', () => {
  test('apps commands', () => {
    assert.deepEqual(run(['apps', 'create', 'hello']).command, { name: 'apps create', app: 'hello' });
    assert.deepEqual(run(['apps', 'create', 'hello', '--org', 'acme']).command, { name: 'apps create', app: 'hello', org: 'acme' });
    assert.deepEqual(run(['app', 'create', 'hello', '-o', 'acme']).command, { name: 'apps create', app: 'hello', org: 'acme' });
    assert.deepEqual(run(['apps', 'list']).command, { name: 'apps list' });
    assert.deepEqual(run(['apps', 'ls', '--org=acme']).command, { name: 'apps list', org: 'acme' });
    assert.deepEqual(run(['apps', 'destroy', 'hello']).command, { name: 'apps destroy', app: 'hello', yes: false });
    assert.deepEqual(run(['apps', 'destroy', 'hello', '-y']).command, { name: 'apps destroy', app: 'hello', yes: true });
  });

  test('global flags before or after the command', () => {
    assert.deepEqual(run(['apps', 'list', '--json', '--api-url', 'http://h:1', '--token', 't']).global, { json: true, apiUrl: 'http://h:1', token: 't' });
    assert.deepEqual(run(['--json', '--api-url=http://h:1', '--token', 't', 'apps', 'list']).global, { json: true, apiUrl: 'http://h:1', token: 't' });
    assert.deepEqual(run(['apps', 'list']).global, { json: false });
  });

  test('machine run with every flag', () => {
    const { command } = run([
      'machine', 'run', '127.0.0.1:5000/hello:latest', '-a', 'hello',
      '--port', '80:8080/tcp:http', '-p', '443:8080/tcp:http:tls', '--port', '5353/udp',
      '--env', 'A=1', '-e', 'B=x=y', '--region', 'local', '--name', 'web', '--cpus', '2', '--memory', '1gb',
      '--restart', 'on-failure', '--cmd', 'httpd -f -p "8080"', '--entrypoint', '/bin/sh -c', '--detach', '--wait-timeout', '30',
    ]);
    assert.deepEqual(command, {
      name: 'machine run', app: 'hello', detach: true, waitTimeout: 30,
      request: {
        name: 'web', region: 'local',
        config: {
          image: '127.0.0.1:5000/hello:latest',
          env: { A: '1', B: 'x=y' },
          services: [
            { protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }, { port: 443, handlers: ['http', 'tls'] }] },
            { protocol: 'udp', internal_port: 5353, ports: [{ port: 5353 }] },
          ],
          guest: { cpus: 2, memory_mb: 1024 },
          restart: { policy: 'on-failure' },
          init: { cmd: ['httpd', '-f', '-p', '8080'], entrypoint: ['/bin/sh', '-c'] },
        },
      },
    });
  });

  test('machine run defaults and TARMAC_APP', () => {
    assert.deepEqual(run(['machine', 'run', 'busybox'], { TARMAC_APP: 'fromenv' }).command, {
      name: 'machine run', app: 'fromenv', detach: false, waitTimeout: 300, request: { config: { image: 'busybox' } },
    });
    assert.equal((run(['m', 'run', 'busybox', '-a', 'flag'], { TARMAC_APP: 'fromenv' }).command as { app: string }).app, 'flag');
  });

  test('machine lifecycle commands', () => {
    assert.deepEqual(run(['machine', 'list', '-a', 'x']).command, { name: 'machine list', app: 'x' });
    assert.deepEqual(run(['machines', 'ls', '--app', 'x']).command, { name: 'machine list', app: 'x' });
    assert.deepEqual(run(['machine', 'status', 'abc', '-a', 'x']).command, { name: 'machine status', app: 'x', id: 'abc' });
    assert.deepEqual(run(['machine', 'start', 'abc', '-a', 'x']).command, { name: 'machine start', app: 'x', id: 'abc', detach: false, waitTimeout: 300 });
    assert.deepEqual(run(['machine', 'stop', 'abc', '-a', 'x', '--signal', 'term', '--timeout', '10']).command, {
      name: 'machine stop', app: 'x', id: 'abc', signal: 'SIGTERM', timeout: 10, detach: false, waitTimeout: 300,
    });
    assert.deepEqual(run(['machine', 'restart', 'abc', '-a', 'x', '-s', 'SIGUSR1', '--timeout', '1m30s', '-d']).command, {
      name: 'machine restart', app: 'x', id: 'abc', signal: 'SIGUSR1', timeout: '1m30s', detach: true, waitTimeout: 300,
    });
    assert.deepEqual(run(['machine', 'destroy', 'abc', '-a', 'x', '--force']).command, { name: 'machine destroy', app: 'x', id: 'abc', force: true });
    assert.deepEqual(run(['machine', 'rm', 'abc', '-a', 'x']).command, { name: 'machine destroy', app: 'x', id: 'abc', force: false });
  });

  test('logs, status, version', () => {
    assert.deepEqual(run(['logs', '-a', 'x']).command, { name: 'logs', app: 'x', follow: false });
    assert.deepEqual(run(['logs', '-a', 'x', '--machine', 'abc', '-f']).command, { name: 'logs', app: 'x', machine: 'abc', follow: true });
    assert.deepEqual(run(['status', '-a', 'x']).command, { name: 'status', app: 'x' });
    assert.deepEqual(run(['version']).command, { name: 'version' });
    assert.deepEqual(run(['--version']).command, { name: 'version' });
  });

  test('help for every command, and host passes through', () => {
    for (const argv of [[], ['--help'], ['help'], ['help', 'machine', 'run'], ['machine', 'run', '--help'], ['apps', '-h'], ['logs', '-h'], ['help', 'apps']]) {
      const r = parseCommandLine(argv, {});
      assert.equal(r.kind, 'help', argv.join(' '));
      if (r.kind === 'help') assert.match(r.text, /Usage/);
    }
    const help = parseCommandLine(['machine', 'run', '--help'], {});
    assert.ok(help.kind === 'help' && help.text.includes('--port') && help.text.includes('--json'));
    assert.deepEqual(parseCommandLine(['host', '--region', 'x'], {}), { kind: 'host', argv: ['--region', 'x'] });
  });

  test('bad input is a one-line usage error', () => {
    usageError(['frobnicate'], /unknown command 'frobnicate'/);
    usageError(['apps'], /needs a subcommand/);
    usageError(['apps', 'explode'], /unknown command 'tarmac apps explode'/);
    usageError(['apps', 'create'], /missing argument NAME/);
    usageError(['apps', 'create', 'a', 'b'], /unexpected argument 'b'/);
    usageError(['apps', 'list', '--bogus'], /unknown flag --bogus/);
    usageError(['--bogus', 'apps', 'list'], /unknown flag --bogus/);
    usageError(['apps', 'list', '--json=yes'], /flag --json takes no value/);
    usageError(['machine', 'list'], /missing --app/);
    usageError(['machine', 'list', '-a'], /flag --app needs a value/);
    usageError(['machine', 'list', '-a', ''], /--app needs a non-empty value/);
    usageError(['machine', 'run', '-a', 'x'], /missing argument IMAGE/);
    usageError(['machine', 'run', 'img', '-a', 'x', '--port', '80:99999'], /not a port number/);
    usageError(['machine', 'run', 'img', '-a', 'x', '--port', 'http'], /not a port number/);
    usageError(['machine', 'run', 'img', '-a', 'x', '--port', '80/sctp'], /protocol must be tcp or udp/);
    usageError(['machine', 'run', 'img', '-a', 'x', '--port', '80/tcp:gopher'], /unknown handler 'gopher'/);
    usageError(['machine', 'run', 'img', '-a', 'x', '--port', '80/tcp', '--port', '80/tcp'], /given twice/);
    usageError(['machine', 'run', 'img', '-a', 'x', '--env', 'NOVALUE'], /NAME=VALUE/);
    usageError(['machine', 'run', 'img', '-a', 'x', '--env', '1X=2'], /not a valid variable name/);
    usageError(['machine', 'run', 'img', '-a', 'x', '--cpus', '0'], /--cpus must be a positive whole number/);
    usageError(['machine', 'run', 'img', '-a', 'x', '--memory', 'lots'], /--memory/);
    usageError(['machine', 'run', 'img', '-a', 'x', '--restart', 'sometimes'], /--restart must be/);
    usageError(['machine', 'run', 'img', '-a', 'x', '--cmd', 'echo "hi'], /unclosed/);
    usageError(['machine', 'stop', 'id', '-a', 'x', '--signal', 'NOPE'], /--signal must be one of/);
    usageError(['machine', 'stop', 'id', '-a', 'x', '--timeout', 'soon'], /--timeout must be seconds/);
    usageError(['machine', 'start', '-a', 'x'], /missing argument ID/);
    usageError(['apps', 'list', '--api-url', 'not a url'], /is not a URL/);
    usageError(['apps', 'list', '--api-url', 'ftp://x'], /must be an http/);
    usageError(['help', 'nothing'], /unknown command 'nothing'/);
  });
});

describe('value parsers', () => {
  test('--port forms follow flyctl', () => {
    assert.deepEqual(parsePortSpec('80'), { port: 80, internal_port: 80, protocol: 'tcp', handlers: [] });
    assert.deepEqual(parsePortSpec('80:8080'), { port: 80, internal_port: 8080, protocol: 'tcp', handlers: [] });
    assert.deepEqual(parsePortSpec('80/tcp'), { port: 80, internal_port: 80, protocol: 'tcp', handlers: [] });
    assert.deepEqual(parsePortSpec('80:8080/tcp:http'), { port: 80, internal_port: 8080, protocol: 'tcp', handlers: ['http'] });
    assert.deepEqual(parsePortSpec('443:8080/tcp:http:tls'), { port: 443, internal_port: 8080, protocol: 'tcp', handlers: ['http', 'tls'] });
    assert.deepEqual(parsePortSpec('443:8080/TCP:tls,http'), { port: 443, internal_port: 8080, protocol: 'tcp', handlers: ['tls', 'http'] });
    assert.deepEqual(parsePortSpec('5432/tcp:pg_tls'), { port: 5432, internal_port: 5432, protocol: 'tcp', handlers: ['pg_tls'] });
    assert.deepEqual(parsePortSpec('53:5353/udp'), { port: 53, internal_port: 5353, protocol: 'udp', handlers: [] });
    for (const bad of ['', ':80', '0', '65536', '80:8080:90', '80/tcp/udp', '80/udp:http', 'x:80']) {
      assert.throws(() => parsePortSpec(bad), UsageError, bad);
    }
    assert.deepEqual(portsToServices(['80:8080/tcp:http', '8443:8080', '9000']), [
      { protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }, { port: 8443 }] },
      { protocol: 'tcp', internal_port: 9000, ports: [{ port: 9000 }] },
    ]);
  });

  test('--env and --cmd', () => {
    assert.deepEqual(parseEnvPairs(['A=1', 'A=2', 'EMPTY=', 'URL=http://x/?a=b']), { A: '2', EMPTY: '', URL: 'http://x/?a=b' });
    assert.deepEqual(splitCommand(`sh -c 'echo "hi there"; exit 3'`), ['sh', '-c', 'echo "hi there"; exit 3']);
    assert.deepEqual(splitCommand(`a\\ b "c\\"d" '' e`), ['a b', 'c"d', '', 'e']);
    assert.throws(() => splitCommand('   '), UsageError);
    assert.deepEqual(buildCreateRequest('img', { ports: [], env: [], memory: '512mb' }), { config: { image: 'img', guest: { memory_mb: 512 } } });
  });

  test('API config: flags, then env, then the data dir token file', async (t) => {
    const dir = await mkdtemp(join(tmpdir(), 'tarmac-cli-cfg-'));
    t.after(() => rm(dir, { recursive: true, force: true }));
    assert.throws(() => resolveApiConfig({ json: false }, {}, dir), /no API token: pass --token or set TARMAC_API_TOKEN/);
    await mkdir(join(dir, '.tarmac'));
    await writeFile(join(dir, '.tarmac', 'admin-token'), 'tm_file\n', { mode: 0o600 });
    assert.deepEqual(resolveApiConfig({ json: false }, {}, dir), { url: 'http://127.0.0.1:4280', token: 'tm_file' });
    await writeFile(join(dir, 'other-token'), 'tm_other');
    await mkdir(join(dir, 'data'));
    await writeFile(join(dir, 'data', 'admin-token'), 'tm_data');
    assert.deepEqual(resolveApiConfig({ json: false }, { TARMAC_DATA_DIR: 'data' }, dir), { url: 'http://127.0.0.1:4280', token: 'tm_data' });
    assert.deepEqual(resolveApiConfig({ json: false }, { TARMAC_API_URL: 'http://e:1', TARMAC_API_TOKEN: 'tm_env' }, dir), { url: 'http://e:1', token: 'tm_env' });
    assert.deepEqual(
      resolveApiConfig({ json: false, apiUrl: 'http://f:2', token: 'tm_flag' }, { TARMAC_API_URL: 'http://e:1', TARMAC_API_TOKEN: 'tm_env' }, dir),
      { url: 'http://f:2', token: 'tm_flag' },
    );
  });
});

describe('formatting', () => {
  test('tables align columns, ignore colour codes, and leave no trailing spaces', () => {
    const out = table(['id', 'state', 'x'], [['a', '\x1b[32mstarted\x1b[39m', ''], ['bbbb', 'stopped', 'z']], { color: false });
    assert.equal(out, 'ID    STATE    X\na     \x1b[32mstarted\x1b[39m\nbbbb  stopped  z\n');
    assert.equal(visibleLength('\x1b[1mID\x1b[22m'), 2);
  });

  test('relative times and event details', () => {
    const now = Date.parse('2024-05-01T12:00:00Z');
    assert.equal(ago('2024-05-01T11:59:50Z', now), '10s ago');
    assert.equal(ago('2024-05-01T11:55:00Z', now), '5m ago');
    assert.equal(ago(now - 3 * 3600_000, now), '3h ago');
    assert.equal(ago('2024-04-28T12:00:00Z', now), '3d ago');
    assert.equal(ago('garbage', now), 'garbage');
    const base = { id: '1', status: 'x', source: 'flyd' as const, timestamp: now };
    assert.equal(eventDetail({ ...base, type: 'exit', request: { exit_event: { exit_code: 137, oom_killed: true, restarting: false } } }), 'exit code 137, OOM killed');
    assert.equal(eventDetail({ ...base, type: 'pull', request: { layer: 'sha256:ab', bytes: 2048, total: 4096 } }), 'layer=sha256:ab bytes=2.0 KB total=4096');
    assert.equal(eventDetail({ ...base, type: 'start' }), '');
  });

  test('services are shown as public→internal/protocol [handlers]', () => {
    const m = { config: { image: 'x', services: portsToServices(['80:8080/tcp:http', '443:8080/tcp:http:tls']) } } as unknown as MachineResponse;
    assert.equal(servicesLabel(m), '80→8080/tcp [http], 443→8080/tcp [http,tls]');
  });
});

// ---- end to end: the real binary against a real API with an embedded catalog ----

const bin = fileURLToPath(new URL('../../bin/tarmac.mjs', import.meta.url));

interface Result { code: number | null; stdout: string; stderr: string }

/** Runs `node bin/tarmac.mjs ARGS` in `cwd` with only the environment given (plus PATH/HOME). */
function tarmac(args: string[], env: Record<string, string>, cwd: string, opts: { stopWhen?: (stdout: string) => boolean } = {}): Promise<Result> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [bin, ...args], {
      cwd,
      env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin', HOME: process.env['HOME'] ?? '/root', ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    let signalled = false;
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      stdout += d;
      if (opts.stopWhen && !signalled && opts.stopWhen(stdout)) {
        signalled = true;
        child.kill('SIGINT');
      }
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

function assertOneErrorLine(r: Result, code: number, pattern: RegExp): void {
  assert.equal(r.code, code, `exit code (stderr: ${r.stderr})`);
  assert.equal(r.stdout, '');
  assert.match(r.stderr, /^Error: [^\n]+\n$/, `exactly one error line, got ${JSON.stringify(r.stderr)}`);
  assert.match(r.stderr, pattern);
}

describe('tarmac against a real API', () => {
  let dir = '';
  let logsDir = '';
  let env: Record<string, string> = {};
  let closeAll: () => Promise<void> = async () => {};
  const token = 'tm_cli_test_admin_token';

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tarmac-cli-e2e-'));
    logsDir = join(dir, 'logs');
    await mkdir(logsDir);
    const { openSqliteCatalog } = await import('../catalog/index.ts');
    const { startApi } = await import('../api/index.ts');
    const { readLogs } = await import('../orchestrator/index.ts');
    const { silentLogger } = await import('../shared/log.ts');
    const catalog = openSqliteCatalog(join(dir, 'catalog.db'));
    const at = new Date().toISOString();
    await catalog.putOrg({ slug: 'personal', name: 'Personal', network_id: await catalog.allocateNetworkNumber(), created_at: at });
    await catalog.putHost({ id: 'h1', region: 'local', roles: ['worker', 'edge', 'api'], host_number: 1, cpus: 2, memory_mb: 4096, address: '127.0.0.1', updated_at: at });
    // Logs come from the worker side: machines' console files in conmon's format, read by the orchestrator's reader.
    const api = await startApi({
      catalog, listen: { host: '127.0.0.1', port: 0 }, log: silentLogger(), region: 'local', adminToken: token,
      workers: {
        signal: async () => {},
        logs: (ids, opts) => readLogs(ids.map((id) => ({ machineId: id, path: join(logsDir, `${id}.log`) })), opts),
      },
    });
    env = { TARMAC_API_URL: api.url, TARMAC_API_TOKEN: token };
    closeAll = async () => {
      await api.close();
      await catalog.close();
    };
  });

  after(async () => {
    await closeAll();
    await rm(dir, { recursive: true, force: true });
  });

  test('apps create, list and destroy, as tables and as JSON', async () => {
    const [hello, world] = await Promise.all([
      tarmac(['apps', 'create', 'hello'], env, dir),
      tarmac(['apps', 'create', 'world', '--org', 'personal', '--json'], env, dir),
    ]);
    assert.equal(hello.code, 0, hello.stderr);
    assert.equal(hello.stdout, 'Created app hello in organization personal\n');
    assert.equal(hello.stderr, '');
    assert.equal(world.code, 0, world.stderr);
    const created = JSON.parse(world.stdout) as { name: string; organization: { slug: string } };
    assert.equal(created.name, 'world');
    assert.equal(created.organization.slug, 'personal');

    let r = await tarmac(['apps', 'list'], env, dir);
    assert.equal(r.code, 0, r.stderr);
    const lines = r.stdout.trimEnd().split('\n');
    assert.match(lines[0]!, /^NAME +ORG +STATUS +MACHINES +CREATED$/);
    assert.match(lines[1]!, /^hello +personal +pending +0 +\d+s ago$/);
    assert.match(lines[2]!, /^world +personal +pending +0 +\d+s ago$/);
    assert.ok(!r.stdout.includes('\x1b['), 'no colour when stdout is not a terminal');

    r = await tarmac(['apps', 'list', '--json'], env, dir);
    const listed = JSON.parse(r.stdout) as { total_apps: number; apps: Array<{ name: string }> };
    assert.equal(listed.total_apps, 2);
    assert.deepEqual(listed.apps.map((a) => a.name).sort(), ['hello', 'world']);

    r = await tarmac(['apps', 'create', 'hello'], env, dir);
    assertOneErrorLine(r, 1, /already taken/);

    r = await tarmac(['apps', 'destroy', 'world'], env, dir);
    assertOneErrorLine(r, 2, /needs --yes when not run from a terminal/);

    r = await tarmac(['apps', 'destroy', 'world', '--yes', '--json'], env, dir);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(JSON.parse(r.stdout), { ok: true });
    r = await tarmac(['apps', 'destroy', 'world', '--yes'], env, dir);
    assertOneErrorLine(r, 1, /world/);
  });

  test('machine list and status on an empty app', async () => {
    assert.equal((await tarmac(['apps', 'create', 'empty'], env, dir)).code, 0);
    const [list, listJson, status, statusJson, machine] = await Promise.all([
      tarmac(['machine', 'list', '-a', 'empty'], env, dir),
      tarmac(['machine', 'list', '-a', 'empty', '--json'], env, dir),
      tarmac(['status', '-a', 'empty'], env, dir),
      tarmac(['status', '-a', 'empty', '--json'], env, dir),
      tarmac(['machine', 'status', '0123456789abcd', '-a', 'empty'], env, dir),
    ]);
    assert.equal(list.code, 0, list.stderr);
    assert.equal(list.stdout, 'No machines in app empty\n');
    assert.deepEqual(JSON.parse(listJson.stdout), []);

    assert.equal(status.code, 0, status.stderr);
    assert.match(status.stdout, /^App +empty$/m);
    assert.match(status.stdout, /^Organization +personal$/m);
    assert.match(status.stdout, /No machines: create one with 'tarmac machine run IMAGE -a empty'/);
    const doc = JSON.parse(statusJson.stdout) as { app: { name: string }; machines: unknown[] };
    assert.equal(doc.app.name, 'empty');
    assert.deepEqual(doc.machines, []);

    assertOneErrorLine(machine, 1, /0123456789abcd/);
  });

  test('errors: a missing app, a bad token, a usage mistake, an unreachable API', async () => {
    const port = await freePort();
    const [missing, missingJson, badToken, usage, unreachable, noToken] = await Promise.all([
      tarmac(['machine', 'list', '-a', 'nope'], env, dir),
      tarmac(['status', '-a', 'nope', '--json'], env, dir),
      tarmac(['apps', 'list', '--token', 'wrong'], env, dir),
      tarmac(['machine', 'run', 'img', '-a', 'x', '--port', '80:notaport'], env, dir),
      tarmac(['apps', 'list'], { TARMAC_API_TOKEN: token, TARMAC_API_URL: `http://127.0.0.1:${port}` }, dir),
      // No token anywhere: the data dir has none either.
      tarmac(['apps', 'list'], { TARMAC_API_URL: env['TARMAC_API_URL']! }, dir),
    ]);
    assertOneErrorLine(missing, 1, /nope/);
    assertOneErrorLine(missingJson, 1, /nope/);
    assertOneErrorLine(badToken, 1, /check --token or TARMAC_API_TOKEN/);
    assertOneErrorLine(usage, 2, /not a port number.*See 'tarmac machine run --help'/);
    assertOneErrorLine(unreachable, 1, new RegExp(`^Error: cannot reach the Tarmac API at http://127\\.0\\.0\\.1:${port}: is \`npm start\` running\\?\\n$`));
    assertOneErrorLine(noToken, 1, /no API token/);
  });

  test('the token is read from $TARMAC_DATA_DIR/admin-token', async () => {
    const data = join(dir, 'data');
    await mkdir(data, { recursive: true });
    await writeFile(join(data, 'admin-token'), `${token}\n`, { mode: 0o600 });
    const r = await tarmac(['apps', 'list', '--json'], { TARMAC_API_URL: env['TARMAC_API_URL']!, TARMAC_DATA_DIR: data }, dir);
    assert.equal(r.code, 0, r.stderr);
    assert.ok(Array.isArray((JSON.parse(r.stdout) as { apps: unknown[] }).apps));
  });

  test('machine run --detach, list, status, a timed-out wait, destroy', async () => {
    assert.equal((await tarmac(['apps', 'create', 'web'], env, dir)).code, 0);
    let r = await tarmac(['machine', 'run', '127.0.0.1:5000/hello:latest', '-a', 'web', '--port', '80:8080/tcp:http', '--env', 'A=1', '--name', 'one', '--detach', '--json'], env, dir);
    assert.equal(r.code, 0, r.stderr);
    const m = JSON.parse(r.stdout) as MachineResponse;
    assert.match(m.id, /^[0-9a-f]{14}$/);
    assert.equal(m.name, 'one');
    assert.deepEqual(m.config.env, { A: '1' });
    assert.deepEqual(m.config.services, [{ protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }] }]);

    r = await tarmac(['machine', 'list', '-a', 'web'], env, dir);
    assert.equal(r.code, 0, r.stderr);
    const [head, row] = r.stdout.trimEnd().split('\n');
    assert.match(head!, /^ID +NAME +STATE +REGION +IMAGE +IP +UPDATED$/);
    assert.match(row!, new RegExp(`^${m.id} +one +created +local +127\\.0\\.0\\.1:5000/hello:latest +fdaa:\\S+ +\\d+s ago$`));

    r = await tarmac(['machine', 'list', '-a', 'web'], { ...env, FORCE_COLOR: '1' }, dir);
    assert.match(r.stdout, /^\x1b\[1mID +NAME/, 'bold headers when colour is forced');
    assert.match(r.stdout, /\x1b\[33mcreated\x1b\[39m/);

    r = await tarmac(['machine', 'status', m.id, '-a', 'web'], env, dir);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`^ID +${m.id}$`, 'm'));
    assert.match(r.stdout, /^Services +80→8080\/tcp \[http\]$/m);
    assert.match(r.stdout, /^Recent events\nTIMESTAMP +TYPE +STATUS +SOURCE +DETAIL\n\S+ \S+ +launch +created +user/m);
    r = await tarmac(['machine', 'status', m.id, '-a', 'web', '--json'], env, dir);
    assert.equal((JSON.parse(r.stdout) as MachineResponse).id, m.id);

    // Nothing runs machines here, so waiting for it to start runs out, with the events shown as progress.
    r = await tarmac(['machine', 'run', '127.0.0.1:5000/hello:latest', '-a', 'web', '--wait-timeout', '1'], env, dir);
    assert.equal(r.code, 1);
    assert.match(r.stdout, /^Machine [0-9a-f]{14} \(\S+\) created in app web, region local\n {2}launch +created/);
    assert.match(r.stderr, /^Error: machine [0-9a-f]{14} did not start within 1s \(state created\): see 'tarmac machine status [0-9a-f]{14} -a web'\n$/);

    r = await tarmac(['machine', 'destroy', m.id, '-a', 'web', '--force'], env, dir);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, `Destroyed machine ${m.id}\n`);
  });

  test('logs print lines, as NDJSON with --json, and --follow runs until Ctrl-C', async () => {
    assert.equal((await tarmac(['apps', 'create', 'logged'], env, dir)).code, 0);
    const r0 = await tarmac(['machine', 'run', 'busybox', '-a', 'logged', '--detach', '--json'], env, dir);
    const id = (JSON.parse(r0.stdout) as MachineResponse).id;
    const file = join(logsDir, `${id}.log`);
    await writeFile(file, '2024-05-01T12:00:00.000000001Z stdout F hello\n2024-05-01T12:00:01.000000001Z stderr F oops\n');

    let r = await tarmac(['logs', '-a', 'logged'], env, dir);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, `2024-05-01T12:00:00.000000001Z ${id} hello\n2024-05-01T12:00:01.000000001Z ${id} [stderr] oops\n`);

    r = await tarmac(['logs', '-a', 'logged', '--machine', id, '--json'], env, dir);
    const entries = r.stdout.trimEnd().split('\n').map((l) => JSON.parse(l) as { message: string; stream: string; machine_id: string });
    assert.deepEqual(entries.map((e) => [e.stream, e.message, e.machine_id]), [['stdout', 'hello', id], ['stderr', 'oops', id]]);

    r = await tarmac(['logs', '-a', 'logged', '--machine', 'ffffffffffffff'], env, dir);
    assertOneErrorLine(r, 1, /ffffffffffffff/);

    // Follow: a line written after the CLI printed the old ones appears, then Ctrl-C ends it with exit 0.
    let appended = false;
    r = await tarmac(['logs', '-a', 'logged', '-f'], env, dir, {
      stopWhen: (out) => {
        if (!appended && out.includes('oops')) {
          appended = true;
          void appendFile(file, '2024-05-01T12:00:02.000000001Z stdout F later\n');
        }
        return out.includes('later');
      },
    });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /later\n$/);
    assert.equal(r.stderr, '');
  });

  test('help and version need no API', async () => {
    const [help, version, bad] = await Promise.all([
      tarmac(['machine', 'run', '--help'], {}, dir),
      tarmac(['version', '--json'], {}, dir),
      tarmac(['apps', 'list', '--nope'], {}, dir),
    ]);
    assert.equal(help.code, 0);
    assert.match(help.stdout, /Usage:\n {2}tarmac machine run IMAGE -a APP \[flags\]/);
    assert.equal(version.code, 0);
    assert.match((JSON.parse(version.stdout) as { version: string }).version, /^\d+\.\d+\.\d+/);
    assertOneErrorLine(bad, 2, /unknown flag --nope\. See 'tarmac apps list --help'\./);
  });
});
