// Tests of the `tarmac` CLI: pure parsing and formatting, then the real binary against a real host with real machines.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { constants as osConstants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { request } from 'undici';
import {
  buildCreateRequest, parseAutostart, parseAutostop, parseCommandLine, parseEnvPairs, parsePortSpec, portsToServices, splitCommand,
  UsageError, type Command,
} from './args.ts';
import { resolveApiConfig } from './config.ts';
import { runCaptured } from './testing.ts';
import { ago, eventDetail, servicesLabel, table, visibleLength } from './format.ts';
import { Progress, progressLine } from './progress.ts';
import type { LogEntry, MachineEventResponse, MachineResponse } from '../client/index.ts';
import { startRegistry, freePort, type TestRegistry } from '../../test/helpers/registry.ts';
import { httpImage } from '../../test/helpers/images.ts';
import { startTestHost, machineNamespaces, type TestHost } from '../../test/helpers/host.ts';
import { waitFor } from '../../test/helpers/wait.ts';

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

  test('machine run --autostart and --autostop set every service the --port flags make, as flyctl', () => {
    const services = (argv: string[]): unknown => {
      const { command } = run(['machine', 'run', 'img', '-a', 'x', '--port', '80:8080/tcp:http', '--port', '53/udp', ...argv]);
      return command.name === 'machine run' ? command.request.config.services : undefined;
    };
    assert.deepEqual(services(['--autostart', 'false', '--autostop', 'suspend']), [
      { protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }], autostart: false, autostop: 'suspend' },
      { protocol: 'udp', internal_port: 53, ports: [{ port: 53 }], autostart: false, autostop: 'suspend' },
    ]);
    assert.deepEqual(services(['--autostart=TRUE']), [
      { protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }], autostart: true },
      { protocol: 'udp', internal_port: 53, ports: [{ port: 53 }], autostart: true },
    ]);
    // Unset stays unset: the service keeps Fly's defaults (autostart on, autostop off).
    assert.deepEqual(services([]), [
      { protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }] },
      { protocol: 'udp', internal_port: 53, ports: [{ port: 53 }] },
    ]);
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
    assert.deepEqual(run(['status', '--hosts']).command, { name: 'status', hosts: true });
    assert.deepEqual(run(['status', '--hosts', '--json']).global, { json: true });
    assert.throws(() => parseCommandLine(['status', '--hosts', '-a', 'x'], {}), /takes no --app/);
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
    usageError(['machine', 'run', 'img', '-a', 'x', '-p', '80', '--autostart', 'maybe'], /--autostart must be true or false, not 'maybe'/);
    usageError(['machine', 'run', 'img', '-a', 'x', '-p', '80', '--autostop', 'sleep'], /--autostop must be off, stop or suspend/);
    usageError(['machine', 'run', 'img', '-a', 'x', '-p', '80', '--autostart'], /flag --autostart needs a value/);
    usageError(['machine', 'run', 'img', '-a', 'x', '--autostop', 'stop'], /--autostop applies to the services --port publishes/);
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

  test('--autostart and --autostop values follow flyctl', () => {
    assert.equal(parseAutostart('true'), true);
    assert.equal(parseAutostart('False'), false);
    assert.throws(() => parseAutostart('yes'), UsageError);
    assert.deepEqual(['off', 'stop', 'suspend', 'true', 'FALSE', 'Stop'].map(parseAutostop), ['off', 'stop', 'suspend', 'stop', 'off', 'stop']);
    assert.throws(() => parseAutostop(''), UsageError);
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


describe('machine progress', () => {
  const t0 = Date.parse('2024-05-01T12:00:00Z');
  const ev = (n: number, type: string, status: string, request?: Record<string, unknown>): MachineEventResponse => ({
    id: `e${n}`, type, status, source: 'flyd', timestamp: t0 + n * 100, ...(request ? { request } : {}),
  });
  const image = '127.0.0.1:5000/hello:latest';
  const digest = `sha256:${'ab'.repeat(32)}`;
  // What the orchestrator writes for a cold image: starting, a first pulling, pulling with totals, pulled, started.
  const cold = [
    ev(0, 'launch', 'created'),
    ev(1, 'start', 'starting'),
    ev(2, 'pull', 'pulling', { image }),
    ev(3, 'pull', 'pulling', { image, layers: 2, bytes: 512 * 1024, total: 2 * 1024 * 1024 }),
    ev(4, 'pull', 'pulling', { image, layers: 2, bytes: 2 * 1024 * 1024, total: 2 * 1024 * 1024 }),
    ev(5, 'pull', 'pulled', { image, layers: 2, bytes: 2 * 1024 * 1024, total: 2 * 1024 * 1024, digest }),
    ev(12, 'start', 'started', { pull_ms: 400 }),
  ];
  const render = async (tty: boolean): Promise<string> => {
    let out = '';
    const p = new Progress(async (s) => { out += s; }, tty, { color: false });
    for (const e of cold) await p.event(e);
    await p.end();
    return out;
  };

  test('not on a terminal: one line per phase', async () => {
    assert.equal(await render(false), [
      '  launch   created',
      '  start    starting',
      `  pull     pulling  ${image}`,
      `  pull     pulled   ${image}  2.0 MB, 2 layers, sha256:abababababab`,
      '  start    started  in 1.1s (image 0.4s)',
      '',
    ].join('\n'));
  });

  test('on a terminal: the pull line rewrites itself with bytes and total, and pulled ends it', async () => {
    const out = await render(true);
    assert.equal(out, [
      '  launch   created\n',
      '  start    starting\n',
      `  pull     pulling  ${image}`,
      `\r\x1b[K  pull     pulling  ${image}  512.0 KB of 2.0 MB (25%), 2 layers`,
      `\r\x1b[K  pull     pulling  ${image}  2.0 MB of 2.0 MB (100%), 2 layers`,
      `\r\x1b[K  pull     pulled   ${image}  2.0 MB, 2 layers, sha256:abababababab\n`,
      '  start    started  in 1.1s (image 0.4s)\n',
    ].join(''));
  });

  test('other events keep their generic detail', () => {
    assert.equal(progressLine(ev(1, 'exit', 'stopped', { exit_event: { exit_code: 3, oom_killed: false, restarting: true } }), { color: false }),
      '  exit     stopped  exit code 3, restarting');
    assert.equal(progressLine(ev(1, 'start', 'started'), { color: false }), '  start    started');
    assert.equal(progressLine(ev(3, 'start', 'started', { pull_ms: 2 }), { color: false }, t0 + 100), '  start    started  in 0.2s');
  });
});

// ---- end to end: the real binary against a real host (API, orchestrator, runc machines, proxy) ----

const bin = fileURLToPath(new URL('../../bin/tarmac.mjs', import.meta.url));

interface Result { code: number | null; stdout: string; stderr: string }

/** Runs `node bin/tarmac.mjs ARGS` in `cwd` with only the environment given (plus PATH/HOME). */
function tarmac(
  args: string[], env: Record<string, string>, cwd: string,
  opts: { onStdout?: (stdout: string) => void; stopWhen?: (stdout: string) => boolean } = {},
): Promise<Result> {
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
      opts.onStdout?.(stdout);
      if (opts.stopWhen && !signalled && opts.stopWhen(stdout)) {
        signalled = true;
        child.kill('SIGINT');
      }
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), 90_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/**
 * The same CLI in this process (captured streams, no terminal): for the checks of tables, JSON and error lines that
 * do not need a process of their own, since every `node bin/tarmac.mjs` costs ~0.5 s of CPU.
 */
const cli: (args: string[], env: Record<string, string>, cwd: string) => Promise<Result> = runCaptured;

function assertOneErrorLine(r: Result, code: number, pattern: RegExp): void {
  assert.equal(r.code, code, `exit code (stderr: ${r.stderr})`);
  assert.equal(r.stdout, '');
  assert.match(r.stderr, /^Error: [^\n]+\n$/, `exactly one error line, got ${JSON.stringify(r.stderr)}`);
  assert.match(r.stderr, pattern);
}

function ok(r: Result): string {
  assert.equal(r.code, 0, `exit code ${r.code}, stderr: ${r.stderr}, stdout: ${r.stdout}`);
  assert.equal(r.stderr, '');
  return r.stdout;
}

describe('tarmac against a real host', () => {
  let registry: TestRegistry | undefined;
  let h: TestHost | undefined;
  let httpRef = '';
  let dir = '';
  let env: Record<string, string> = {};
  const made: string[] = [];

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tarmac-cli-e2e-'));
    registry = await startRegistry();
    [httpRef, h] = await Promise.all([httpImage(registry.host, { name: 'cli-http' }), startTestHost()]);
    env = { TARMAC_API_URL: h.host.apiUrl!, TARMAC_API_TOKEN: h.host.adminToken };
  });

  after(async () => {
    try {
      await h?.close();
    } finally {
      await registry?.stop();
      await rm(dir, { recursive: true, force: true });
    }
    const left = (await machineNamespaces()).filter((n) => made.includes(n));
    assert.deepEqual(left, [], 'no network namespace of these machines is left');
  });

  const get = async (app: string): Promise<{ status: number; body: string }> => {
    const res = await request(`${h!.proxyUrl}/`, { headers: { host: `${app}.localhost` } });
    return { status: res.statusCode, body: (await res.body.text()).trim() };
  };

  /** Waits until the app answers through the proxy with `body`; a timeout says what it answered last. */
  const answers = (app: string, body: string, what: string): Promise<true> => waitFor(what, async () => {
    const r = await get(app);
    if (r.body !== body) throw new Error(`last answer ${r.status} ${JSON.stringify(r.body.slice(0, 200))}`);
    return true;
  }, 30_000);

  /** The new machine's id from the first line `machine run` prints (remembered for the leak check). */
  const idOf = (stdout: string): string => {
    const id = /^Machine ([0-9a-f]{14}) /.exec(stdout)?.[1];
    assert.ok(id, `a machine id in ${JSON.stringify(stdout)}`);
    made.push(id);
    return id;
  };

  test('apps create, list and destroy, as tables and as JSON', async () => {
    const [hello, world] = await Promise.all([
      cli(['apps', 'create', 'hello'], env, dir),
      cli(['apps', 'create', 'world', '--org', 'personal', '--json'], env, dir),
    ]);
    assert.equal(ok(hello), 'Created app hello in organization personal\n');
    const created = JSON.parse(ok(world)) as { name: string; organization: { slug: string } };
    assert.equal(created.name, 'world');
    assert.equal(created.organization.slug, 'personal');

    let r = await cli(['apps', 'list'], env, dir);
    const lines = ok(r).trimEnd().split('\n');
    assert.match(lines[0]!, /^NAME +ORG +STATUS +MACHINES +CREATED$/);
    assert.match(lines[1]!, /^hello +personal +pending +0 +\d+s ago$/);
    assert.match(lines[2]!, /^world +personal +pending +0 +\d+s ago$/);
    assert.ok(!r.stdout.includes('\x1b['), 'no colour when stdout is not a terminal');

    const [listed, taken, noYes] = await Promise.all([
      cli(['apps', 'list', '--json'], env, dir),
      cli(['apps', 'create', 'hello'], env, dir),
      cli(['apps', 'destroy', 'world'], env, dir),
    ]);
    const doc = JSON.parse(ok(listed)) as { total_apps: number; apps: Array<{ name: string }> };
    assert.equal(doc.total_apps, 2);
    assert.deepEqual(doc.apps.map((a) => a.name).sort(), ['hello', 'world']);
    assertOneErrorLine(taken, 1, /already taken/);
    assertOneErrorLine(noYes, 2, /needs --yes when not run from a terminal/);

    r = await cli(['apps', 'destroy', 'world', '--yes', '--json'], env, dir);
    assert.deepEqual(JSON.parse(ok(r)), { ok: true });
    r = await cli(['apps', 'destroy', 'world', '--yes'], env, dir);
    assertOneErrorLine(r, 1, /world/);
  });

  test('machine list and status on an empty app', async () => {
    const [list, listJson, status, statusJson, machine] = await Promise.all([
      cli(['machine', 'list', '-a', 'hello'], env, dir),
      cli(['machine', 'list', '-a', 'hello', '--json'], env, dir),
      cli(['status', '-a', 'hello'], env, dir),
      cli(['status', '-a', 'hello', '--json'], env, dir),
      cli(['machine', 'status', '0123456789abcd', '-a', 'hello'], env, dir),
    ]);
    assert.equal(ok(list), 'No machines in app hello\n');
    assert.deepEqual(JSON.parse(ok(listJson)), []);
    assert.match(ok(status), /^App +hello$/m);
    assert.match(status.stdout, /^Organization +personal$/m);
    assert.match(status.stdout, /No machines: create one with 'tarmac machine run IMAGE -a hello'/);
    const doc = JSON.parse(ok(statusJson)) as { app: { name: string }; machines: unknown[] };
    assert.equal(doc.app.name, 'hello');
    assert.deepEqual(doc.machines, []);
    assertOneErrorLine(machine, 1, /0123456789abcd/);
  });

  test('errors: a missing app, a bad token, a usage mistake, an unreachable API, no token', async () => {
    const port = await freePort();
    const [missing, missingJson, badToken, usage, unreachable, noToken] = await Promise.all([
      cli(['machine', 'list', '-a', 'nope'], env, dir),
      cli(['status', '-a', 'nope', '--json'], env, dir),
      cli(['apps', 'list', '--token', 'wrong'], env, dir),
      cli(['machine', 'run', 'img', '-a', 'x', '--port', '80:notaport'], env, dir),
      cli(['apps', 'list'], { TARMAC_API_TOKEN: env['TARMAC_API_TOKEN']!, TARMAC_API_URL: `http://127.0.0.1:${port}` }, dir),
      // No token anywhere: the data dir has none either.
      cli(['apps', 'list'], { TARMAC_API_URL: env['TARMAC_API_URL']! }, dir),
    ]);
    assertOneErrorLine(missing, 1, /nope/);
    assertOneErrorLine(missingJson, 1, /nope/);
    assertOneErrorLine(badToken, 1, /check --token or TARMAC_API_TOKEN/);
    assertOneErrorLine(usage, 2, /not a port number.*See 'tarmac machine run --help'/);
    assertOneErrorLine(unreachable, 1, new RegExp(`^Error: cannot reach the Tarmac API at http://127\\.0\\.0\\.1:${port}: is \`npm start\` running\\?\\n$`));
    assertOneErrorLine(noToken, 1, /no API token/);
  });

  test('the token is read from $TARMAC_DATA_DIR/admin-token (the host writes it there)', async () => {
    const r = await cli(['apps', 'list', '--json'], { TARMAC_API_URL: env['TARMAC_API_URL']!, TARMAC_DATA_DIR: h!.dataDir }, dir);
    assert.ok(Array.isArray((JSON.parse(ok(r)) as { apps: unknown[] }).apps));
  });

  test('help and version need no API', async () => {
    const [help, version, bad] = await Promise.all([
      tarmac(['machine', 'run', '--help'], {}, dir),
      tarmac(['version', '--json'], {}, dir),
      tarmac(['apps', 'list', '--nope'], {}, dir),
    ]);
    assert.match(ok(help), /Usage:\n {2}tarmac machine run IMAGE -a APP \[flags\]/);
    assert.match((JSON.parse(ok(version)) as { version: string }).version, /^\d+\.\d+\.\d+/);
    assertOneErrorLine(bad, 2, /unknown flag --nope\. See 'tarmac apps list --help'\./);
  });

  test('machine run waits with progress, the machine serves through the proxy; list, status, stop, start, restart, destroy', async () => {
    ok(await tarmac(['apps', 'create', 'web'], env, dir));
    // A cold image: the progress shows each phase once (stdout is not a terminal), in order.
    // Without autostart, so that a stopped machine stays stopped when a request comes (below).
    let out = ok(await tarmac([
      'machine', 'run', httpRef, '-a', 'web', '--port', '80:8080/tcp:http', '--env', 'A=1', '--name', 'one', '--autostart', 'false',
    ], env, dir));
    const id = idOf(out);
    const lines = out.trimEnd().split('\n');
    const image = httpRef.replace(/[.]/g, '\\.');
    assert.match(lines[0]!, new RegExp(`^Machine ${id} \\(one\\) created in app web, region local$`));
    const at = (re: RegExp): number => {
      const found = lines.flatMap((l, i) => (re.test(l) ? [i] : []));
      assert.equal(found.length, 1, `one line matching ${re} in:\n${out}`);
      return found[0]!;
    };
    const order = [
      at(/^ {2}launch +created$/),
      at(/^ {2}start +starting$/),
      at(new RegExp(`^ {2}pull +pulling +${image}`)),
      at(new RegExp(`^ {2}pull +pulled +${image} +[\\d.]+ (B|KB|MB), \\d+ layers?, sha256:[0-9a-f]{12}$`)),
      at(/^ {2}start +started +in [\d.]+s( \(image [\d.]+s\))?$/),
      at(new RegExp(`^Machine ${id} is started at fdaa:[0-9a-f:]+, serving 80→8080/tcp \\[http\\]$`)),
    ];
    assert.deepEqual(order, [...order].sort((a, b) => a - b), `phases in order:\n${out}`);
    assert.equal(order.at(-1), lines.length - 1, 'the started line is the last');
    // It returned once started: the machine answers through the proxy with its id.
    await answers('web', id, 'the machine to answer through the proxy');

    const [list, listJson, status, mstatus, colored] = await Promise.all([
      tarmac(['machine', 'list', '-a', 'web'], env, dir),
      tarmac(['machine', 'list', '-a', 'web', '--json'], env, dir),
      tarmac(['status', '-a', 'web'], env, dir),
      cli(['machine', 'status', id, '-a', 'web'], env, dir),
      cli(['machine', 'list', '-a', 'web'], { ...env, FORCE_COLOR: '1' }, dir),
    ]);
    assert.match(ok(colored), /^\x1b\[1mID +NAME/, 'bold headers when colour is forced');
    assert.match(colored.stdout, /\x1b\[32mstarted\x1b\[39m/);
    const [head, row, extra] = ok(list).trimEnd().split('\n');
    assert.match(head!, /^ID +NAME +STATE +REGION +IMAGE +IP +UPDATED$/);
    assert.match(row!, new RegExp(`^${id} +one +started +local +${image} +fdaa:\\S+ +\\d+s ago$`));
    assert.equal(extra, undefined);
    const machines = JSON.parse(ok(listJson)) as MachineResponse[];
    assert.equal(machines.length, 1);
    assert.equal(machines[0]!.state, 'started');
    assert.deepEqual(machines[0]!.config.env, { A: '1' });
    assert.deepEqual(machines[0]!.config.services, [{ protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }], autostart: false }]);
    assert.match(ok(status), /^App +web$/m);
    assert.match(status.stdout, new RegExp(`^${id} +one +started +local`, 'm'));
    assert.match(ok(mstatus), /^State +started$/m);
    assert.match(mstatus.stdout, /^Digest +sha256:[0-9a-f]{64}$/m);
    assert.match(mstatus.stdout, /^Recent events\nTIMESTAMP +TYPE +STATUS +SOURCE +DETAIL\n/m);
    assert.match(mstatus.stdout, / start +started +flyd +pull_ms=\d+$/m);

    // stop and start wait for the new state.
    assert.equal(ok(await tarmac(['machine', 'stop', id, '-a', 'web'], env, dir)), `Machine ${id} stopped\n`);
    assert.equal((await h!.client.getMachine('web', id)).state, 'stopped');
    assert.equal((await get('web')).status, 503, 'a stopped machine without autostart serves nothing');
    assert.equal((await h!.client.getMachine('web', id)).state, 'stopped', 'the request did not start it');
    assert.equal(ok(await tarmac(['machine', 'start', id, '-a', 'web'], env, dir)), `Machine ${id} started\n`);
    assert.equal((await h!.client.getMachine('web', id)).state, 'started');
    await answers('web', id, 'the started machine to answer');

    // Regression: restart returned at once (the machine is `started` before and after, with the same instance).
    // It now returns only after the machine has started again, after the restart request.
    out = ok(await tarmac(['machine', 'restart', id, '-a', 'web'], env, dir));
    const events = await h!.client.listEvents('web', id);
    const restart = events.find((e) => e.type === 'restart');
    assert.ok(restart, 'the API recorded the restart');
    const startedAfter = events.filter((e) => e.type === 'start' && e.status === 'started' && e.timestamp >= restart.timestamp);
    assert.equal(startedAfter.length, 1, 'the machine had started again when restart returned');
    assert.ok(events.some((e) => e.type === 'exit' && e.timestamp >= restart.timestamp), 'the old process exited');
    assert.match(out, /^ {2}start +starting\n {2}start +started +in [\d.]+s/m);
    assert.match(out, new RegExp(`Machine ${id} restarted\\n$`));
    assert.doesNotMatch(out, /pull/, 'a restart pulls nothing');
    await answers('web', id, 'the restarted machine to answer');

    assert.equal(ok(await tarmac(['machine', 'destroy', id, '-a', 'web', '--force'], env, dir)), `Destroyed machine ${id}\n`);
    await h!.client.waitMachine('web', id, { state: 'destroyed', timeout: 60 });
    assert.equal(ok(await cli(['machine', 'list', '-a', 'web'], env, dir)), 'No machines in app web\n');
  });

  test('machine run of an image that does not exist fails with one error line', async () => {
    const r = await tarmac(['machine', 'run', `${registry!.host}/missing:latest`, '-a', 'web'], env, dir);
    assert.equal(r.code, 1, r.stderr);
    const id = idOf(r.stdout);
    assert.match(r.stderr, new RegExp(`^Error: machine ${id} is failed \\([^\\n]*missing[^\\n]*\\): see 'tarmac machine status ${id} -a web'\\n$`));
    assert.match(r.stdout, /^ {2}failed +failed +image "[^"]+" not found in registry/m);
    assert.equal((await h!.client.getMachine('web', id)).state, 'failed');

    // --detach returns at once with the machine as JSON, before it gets anywhere.
    const d = await cli(['machine', 'run', `${registry!.host}/missing:latest`, '-a', 'web', '--name', 'detached', '--detach', '--json'], env, dir);
    const m = JSON.parse(ok(d)) as MachineResponse;
    made.push(m.id);
    assert.match(m.id, /^[0-9a-f]{14}$/);
    assert.equal(m.name, 'detached');
    assert.equal(m.state, 'created');
  });

  test('logs of real machines: lines, NDJSON, one machine, and --follow until Ctrl-C; apps destroy', async () => {
    ok(await tarmac(['apps', 'create', 'logged'], env, dir));
    const [echo, trap] = await Promise.all([
      tarmac(['machine', 'run', httpRef, '-a', 'logged', '--cmd', `sh -c 'echo hello; echo oops >&2; exec sleep 600'`], env, dir),
      tarmac(['machine', 'run', httpRef, '-a', 'logged', '--cmd', `sh -c 'trap "echo got-usr1" USR1; echo ready; while true; do sleep 0.1; done'`], env, dir),
    ]);
    const echoId = idOf(ok(echo));
    const trapId = idOf(ok(trap));
    assert.doesNotMatch(echo.stdout, /pull/, 'a cached image pulls nothing');
    assert.match(echo.stdout, /^ {2}start +started +in [\d.]+s/m);

    const ts = '\\d{4}-\\d\\d-\\d\\dT\\S+';
    await waitFor('the three log lines', async () => {
      let n = 0;
      for await (const _ of h!.client.logs('logged')) n++;
      return n >= 3;
    }, 30_000);
    const all = ok(await tarmac(['logs', '-a', 'logged'], env, dir));
    assert.match(all, new RegExp(`^${ts} ${echoId} hello$`, 'm'));
    assert.match(all, new RegExp(`^${ts} ${echoId} \\[stderr\\] oops$`, 'm'));
    assert.match(all, new RegExp(`^${ts} ${trapId} ready$`, 'm'));

    const [one, unknown] = await Promise.all([
      tarmac(['logs', '-a', 'logged', '--machine', echoId, '--json'], env, dir),
      cli(['logs', '-a', 'logged', '--machine', 'ffffffffffffff'], env, dir),
    ]);
    const entries = ok(one).trimEnd().split('\n').map((l) => JSON.parse(l) as LogEntry);
    assert.deepEqual(entries.map((e) => [e.machine_id, e.stream, e.message]), [[echoId, 'stdout', 'hello'], [echoId, 'stderr', 'oops']]);
    assertOneErrorLine(unknown, 1, /ffffffffffffff/);

    // Follow: once the old lines are out, a signal makes the machine write a new one, which appears; Ctrl-C ends it.
    let signalled: Promise<unknown> | undefined;
    const follow = await tarmac(['logs', '-a', 'logged', '--machine', trapId, '-f'], env, dir, {
      onStdout: (s) => { if (!signalled && s.includes('ready')) signalled = h!.client.signalMachine('logged', trapId, 'SIGUSR1'); },
      stopWhen: (s) => s.includes('got-usr1'),
    });
    assert.deepEqual(await signalled, { ok: true });
    assert.match(ok(follow), new RegExp(`^${ts} ${trapId} ready\\n${ts} ${trapId} got-usr1\\n$`));

    const statusOut = await cli(['status', '-a', 'logged'], env, dir);
    assert.match(ok(statusOut), new RegExp(`^${echoId} +\\S+ +started`, 'm'));
    assert.match(statusOut.stdout, new RegExp(`^${trapId} +\\S+ +started`, 'm'));

    // apps destroy takes its machines with it.
    assert.equal(ok(await tarmac(['apps', 'destroy', 'logged', '--yes'], env, dir)), 'Destroyed app logged\n');
    assertOneErrorLine(await cli(['machine', 'list', '-a', 'logged'], env, dir), 1, /logged/);
    await h!.host.orchestrator?.idle();
    await waitFor('the machines\' namespaces to go', async () => !(await machineNamespaces()).some((n) => n === echoId || n === trapId));
  });

  test('a signal sent through the API reaches the machine\'s process (tini forwards it), its output comes back as log NDJSON', async () => {
    const c = h!.client;
    await c.createApp({ app_name: 'sig', org_slug: 'personal' });
    const m = await c.createMachine('sig', {
      config: { image: httpRef, init: { cmd: ['sh', '-c', 'trap "echo got-usr1" USR1; echo ready; while true; do sleep 0.1; done'] } },
    });
    made.push(m.id);
    await c.waitMachine('sig', m.id, { state: 'started', timeout: 60 });
    const messages = async (): Promise<string[]> => {
      const out: string[] = [];
      for await (const l of c.logs('sig')) out.push(l.message);
      return out;
    };
    await waitFor('the trap to be set', async () => (await messages()).includes('ready'));
    assert.deepEqual(await c.signalMachine('sig', m.id, 'SIGUSR1'), { ok: true });
    await waitFor('got-usr1 in the logs', async () => (await messages()).filter((s) => s === 'got-usr1').length === 1);
    // Signals by number too (as Fly's API allows).
    const res = await fetch(`${h!.host.apiUrl}/v1/apps/sig/machines/${m.id}/signal`, {
      method: 'POST', headers: { authorization: `Bearer ${h!.host.adminToken}`, 'content-type': 'application/json' },
      body: JSON.stringify({ signal: osConstants.signals.SIGUSR1 }),
    });
    assert.equal(res.status, 200, await res.text());
    await waitFor('a second got-usr1', async () => (await messages()).filter((s) => s === 'got-usr1').length === 2);
    const events = await c.listEvents('sig', m.id);
    assert.deepEqual(events.filter((e) => e.type === 'signal').map((e) => e.status), ['SIGUSR1', 'SIGUSR1']);

    // Following: the stream ends when the client stops reading.
    const stop = new AbortController();
    const followed: string[] = [];
    let sent = false;
    for await (const l of c.logs('sig', { machine_id: m.id, follow: true, signal: stop.signal })) {
      followed.push(l.message);
      if (!sent && followed.filter((s) => s === 'got-usr1').length === 2) {
        sent = true;
        await c.signalMachine('sig', m.id, 'SIGUSR1');
      }
      if (followed.filter((s) => s === 'got-usr1').length === 3) stop.abort();
    }
    assert.deepEqual(followed, ['ready', 'got-usr1', 'got-usr1', 'got-usr1']);
    await c.deleteApp('sig');
  });
});
