// Command-line parsing for `tarmac`: the command table, flag specs, and pure parsers for --port, --env and --cmd.
import { parseArgs } from 'node:util';
import type { CreateMachineRequest, MachineConfig } from '../client/index.ts';

/** A mistake in how the CLI was called: printed as one line, exit code 2. */
export class UsageError extends Error {
  override readonly name = 'UsageError';
}

export interface GlobalOptions {
  apiUrl?: string;
  token?: string;
  json: boolean;
}

/** What a parsed command line asks for, already validated and typed. */
export type Command =
  | { name: 'apps create'; app: string; org?: string }
  | { name: 'apps list'; org?: string }
  | { name: 'apps destroy'; app: string; yes: boolean }
  | { name: 'machine run'; app: string; request: CreateMachineRequest; detach: boolean; waitTimeout: number }
  | { name: 'machine list'; app: string }
  | { name: 'machine status'; app: string; id: string }
  | { name: 'machine start'; app: string; id: string; detach: boolean; waitTimeout: number }
  | { name: 'machine stop'; app: string; id: string; signal?: string; timeout?: string | number; detach: boolean; waitTimeout: number }
  | { name: 'machine restart'; app: string; id: string; signal?: string; timeout?: string | number; detach: boolean; waitTimeout: number }
  | { name: 'machine destroy'; app: string; id: string; force: boolean }
  | { name: 'logs'; app: string; machine?: string; follow: boolean }
  | { name: 'status'; app: string; hosts?: never }
  | { name: 'status'; hosts: true; app?: never }
  | { name: 'certs add'; app: string; hostname: string; fullchain: string; privateKey: string }
  | { name: 'certs list'; app: string }
  | { name: 'certs show'; app: string; hostname: string }
  | { name: 'certs remove'; app: string; hostname: string }
  | { name: 'certs request'; app: string; hostname: string; wait: boolean }
  | { name: 'ips allocate-v4' | 'ips allocate-v6'; app: string; region?: string }
  | { name: 'ips list'; app: string }
  | { name: 'ips release'; app: string; ip: string }
  | { name: 'wireguard create'; org: string; peer: string; gateway?: string }
  | { name: 'version' };

export type CommandName = Command['name'];

export type ParseResult =
  | { kind: 'run'; command: Command; global: GlobalOptions }
  | { kind: 'help'; text: string }
  /** `tarmac host …`: the host daemon, wired outside the CLI's own commands. */
  | { kind: 'host'; argv: string[] };

interface FlagSpec {
  type: 'string' | 'boolean';
  short?: string;
  multiple?: boolean;
  /** Placeholder shown in help, e.g. SLUG. */
  value?: string;
  description: string;
}

interface CommandSpec {
  name: CommandName;
  summary: string;
  args: Array<{ name: string; required: boolean }>;
  flags: Record<string, FlagSpec>;
  examples?: string[];
}

const appFlag: FlagSpec = { type: 'string', short: 'a', value: 'APP', description: 'App name (default: $TARMAC_APP)' };
const detachFlag: FlagSpec = { type: 'boolean', short: 'd', description: 'Return without waiting for the machine to reach its new state' };
const waitTimeoutFlag: FlagSpec = { type: 'string', value: 'S', description: 'Seconds to wait for the new state (default 300)' };
const signalFlag: FlagSpec = { type: 'string', short: 's', value: 'SIG', description: 'Signal to stop the machine with (default: its stop_config.signal)' };
const timeoutFlag: FlagSpec = { type: 'string', value: 'S', description: 'Seconds (or a duration like 30s) before SIGKILL follows the signal' };

export const globalFlags: Record<string, FlagSpec> = {
  'api-url': { type: 'string', value: 'URL', description: 'Machines API URL (default: $TARMAC_API_URL, else http://127.0.0.1:4280)' },
  token: { type: 'string', value: 'TOKEN', description: 'API token (default: $TARMAC_API_TOKEN, else $TARMAC_DATA_DIR/admin-token)' },
  json: { type: 'boolean', description: 'Print the API\'s JSON instead of tables (NDJSON for logs)' },
  help: { type: 'boolean', short: 'h', description: 'Show help for this command' },
};

export const commands: CommandSpec[] = [
  {
    name: 'apps create', summary: 'Create an app',
    args: [{ name: 'NAME', required: true }],
    flags: { org: { type: 'string', short: 'o', value: 'SLUG', description: 'Organization that owns the app (default: your token\'s, else personal)' } },
    examples: ['tarmac apps create hello'],
  },
  {
    name: 'apps list', summary: 'List apps',
    args: [],
    flags: { org: { type: 'string', short: 'o', value: 'SLUG', description: 'Only apps of this organization' } },
  },
  {
    name: 'apps destroy', summary: 'Destroy an app with all its machines',
    args: [{ name: 'NAME', required: true }],
    flags: { yes: { type: 'boolean', short: 'y', description: 'Do not ask for confirmation' } },
    examples: ['tarmac apps destroy hello --yes'],
  },
  {
    name: 'machine run', summary: 'Create a machine from an image and wait for it to start',
    args: [{ name: 'IMAGE', required: true }],
    flags: {
      app: appFlag,
      port: { type: 'string', short: 'p', multiple: true, value: 'SPEC', description: 'Publish PORT[:INTERNAL][/tcp|udp][:HANDLER…], e.g. 80:8080/tcp:http (repeatable)' },
      env: { type: 'string', short: 'e', multiple: true, value: 'K=V', description: 'Set an environment variable (repeatable)' },
      region: { type: 'string', short: 'r', value: 'REGION', description: 'Region to place the machine in' },
      name: { type: 'string', short: 'n', value: 'NAME', description: 'Machine name (default: generated)' },
      cpus: { type: 'string', value: 'N', description: 'Number of CPUs (default 1)' },
      memory: { type: 'string', short: 'm', value: 'MB', description: 'Memory in MB, or with a unit: 512mb, 1gb (default 256)' },
      restart: { type: 'string', value: 'POLICY', description: 'Restart policy: no, always, on-failure' },
      autostart: { type: 'string', value: 'BOOL', description: 'true or false: whether a request starts the machine when it is stopped (default true, as on Fly)' },
      autostop: { type: 'string', value: 'MODE', description: 'off, stop or suspend (true means stop, false off): stop the machine when requests stop coming (default off)' },
      cmd: { type: 'string', value: '"CMD"', description: 'Command to run instead of the image\'s CMD' },
      entrypoint: { type: 'string', value: '"CMD"', description: 'Entrypoint instead of the image\'s ENTRYPOINT' },
      detach: { type: 'boolean', short: 'd', description: 'Return once the machine is created, without waiting for it to start' },
      'wait-timeout': waitTimeoutFlag,
    },
    examples: [
      'tarmac machine run 127.0.0.1:5000/hello:latest -a hello --port 80:8080/tcp:http',
      'tarmac machine run busybox -a hello --env GREETING=hi --cmd "httpd -f -p 8080"',
      'tarmac machine run 127.0.0.1:5000/hello:latest -a hello --port 80:8080/tcp:http --autostop stop --autostart true',
    ],
  },
  { name: 'machine list', summary: 'List the machines of an app', args: [], flags: { app: appFlag } },
  {
    name: 'machine status', summary: 'Show a machine\'s details and recent events',
    args: [{ name: 'ID', required: true }], flags: { app: appFlag },
  },
  {
    name: 'machine start', summary: 'Start a stopped machine',
    args: [{ name: 'ID', required: true }], flags: { app: appFlag, detach: detachFlag, 'wait-timeout': waitTimeoutFlag },
  },
  {
    name: 'machine stop', summary: 'Stop a machine',
    args: [{ name: 'ID', required: true }],
    flags: { app: appFlag, signal: signalFlag, timeout: timeoutFlag, detach: detachFlag, 'wait-timeout': waitTimeoutFlag },
  },
  {
    name: 'machine restart', summary: 'Restart a machine',
    args: [{ name: 'ID', required: true }],
    flags: { app: appFlag, signal: signalFlag, timeout: timeoutFlag, detach: detachFlag, 'wait-timeout': waitTimeoutFlag },
  },
  {
    name: 'machine destroy', summary: 'Destroy a machine',
    args: [{ name: 'ID', required: true }],
    flags: { app: appFlag, force: { type: 'boolean', short: 'f', description: 'Destroy even if the machine is running' } },
  },
  {
    name: 'logs', summary: 'Show the logs of an app\'s machines',
    args: [],
    flags: {
      app: appFlag,
      machine: { type: 'string', value: 'ID', description: 'Only this machine\'s logs' },
      follow: { type: 'boolean', short: 'f', description: 'Keep printing new lines until interrupted' },
    },
    examples: ['tarmac logs -a hello --follow'],
  },
  {
    name: 'status', summary: 'Show an app and its machines, or with --hosts every host of the fleet',
    args: [],
    flags: {
      app: appFlag,
      hosts: { type: 'boolean', description: 'Show every host: region, roles, machines, and its catalog copy\'s revision, lag and staleness (admin token)' },
    },
    examples: ['tarmac status -a hello', 'tarmac status --hosts'],
  },
  {
    name: 'certs add', summary: 'Add (or replace) the TLS certificate of one of an app\'s host names, from PEM files',
    args: [{ name: 'HOSTNAME', required: true }],
    flags: {
      app: appFlag,
      fullchain: { type: 'string', value: 'FILE', description: 'PEM certificate chain, leaf first' },
      'private-key': { type: 'string', value: 'FILE', description: 'PEM private key of the leaf (unencrypted); sent to the API, never shown again' },
    },
    examples: ['tarmac certs add www.example.com -a hello --fullchain fullchain.pem --private-key privkey.pem'],
  },
  { name: 'certs list', summary: 'List an app\'s certificates', args: [], flags: { app: appFlag } },
  { name: 'certs show', summary: 'Show a certificate (issuer, validity, fingerprint; never the key)', args: [{ name: 'HOSTNAME', required: true }], flags: { app: appFlag } },
  { name: 'certs remove', summary: 'Remove a host name\'s certificate', args: [{ name: 'HOSTNAME', required: true }], flags: { app: appFlag } },
  {
    name: 'certs request', summary: 'Get (and keep renewing) a certificate for one of an app\'s host names through ACME (Let\'s Encrypt)',
    args: [{ name: 'HOSTNAME', required: true }],
    flags: { app: appFlag, wait: { type: 'boolean', description: 'Wait until the certificate is issued or the order failed' } },
    examples: ['tarmac certs request www.example.com -a hello --wait'],
  },
  {
    name: 'ips allocate-v4', summary: 'Allocate an IPv4 address of the app\'s own (the proxy listens there on its non-HTTP ports)',
    args: [], flags: { app: appFlag, region: { type: 'string', value: 'REGION', description: 'Region the address is for (default: global)' } },
    examples: ['tarmac ips allocate-v4 -a db'],
  },
  {
    name: 'ips allocate-v6', summary: 'Allocate an IPv6 address of the app\'s own (needs an IPv6 pool in the host config)',
    args: [], flags: { app: appFlag, region: { type: 'string', value: 'REGION', description: 'Region the address is for (default: global)' } },
  },
  { name: 'ips list', summary: 'List an app\'s addresses', args: [], flags: { app: appFlag } },
  { name: 'ips release', summary: 'Release one of an app\'s addresses', args: [{ name: 'ADDRESS', required: true }], flags: { app: appFlag } },
  {
    name: 'wireguard create', summary: 'Join a device to an organization\'s private network: prints its WireGuard config (with a new private key, shown once)',
    args: [{ name: 'ORG', required: true }, { name: 'NAME', required: true }],
    flags: { gateway: { type: 'string', value: 'HOST', description: 'Worker host the device connects to (default: the first worker in the mesh)' } },
    examples: ['tarmac wireguard create personal laptop > laptop.conf && wg-quick up ./laptop.conf'],
  },
  { name: 'version', summary: 'Print the version of tarmac', args: [], flags: {} },
];

/** Words that may stand for a group or a verb. */
const groupAliases: Record<string, string> = {
  apps: 'apps', app: 'apps', machine: 'machine', machines: 'machine', m: 'machine', certs: 'certs', cert: 'certs', certificates: 'certs', ips: 'ips', ip: 'ips', wireguard: 'wireguard', wg: 'wireguard',
};
const verbAliases: Record<string, string> = { ls: 'list', rm: 'destroy', remove: 'destroy', delete: 'destroy', show: 'status' };

const hostSummary = 'Run a Tarmac host with every role in the foreground (what `npm start` runs)';

/** Parses argv (without node and script). Throws UsageError for anything malformed. */
export function parseCommandLine(argv: readonly string[], env: Readonly<Record<string, string | undefined>> = {}): ParseResult {
  // Global flags may come before the command words: `tarmac --json apps list`.
  const leading: string[] = [];
  let i = 0;
  while (i < argv.length && argv[i]!.startsWith('-')) {
    const tok = argv[i]!;
    const name = tok.replace(/^--?/, '').split('=')[0]!;
    if (tok === '--version' || tok === '-v') return { kind: 'run', command: { name: 'version' }, global: globalFrom(argv.slice(i + 1).includes('--json') ? { json: true } : {}) };
    if (tok === '--help' || tok === '-h') return { kind: 'help', text: mainHelp() };
    if (name === 'json') { leading.push(tok); i++; continue; }
    if (name === 'api-url' || name === 'token') {
      leading.push(tok);
      if (!tok.includes('=')) {
        if (i + 1 >= argv.length) throw new UsageError(`flag --${name} needs a value. See 'tarmac --help'.`);
        leading.push(argv[i + 1]!);
        i++;
      }
      i++;
      continue;
    }
    throw new UsageError(`unknown flag ${tok.split('=')[0]}. See 'tarmac --help'.`);
  }
  const words = argv.slice(i);
  const first = words[0];
  if (first === undefined) return { kind: 'help', text: mainHelp() };
  if (first === 'help') return { kind: 'help', text: helpFor(words.slice(1)) };
  if (first === 'host') return { kind: 'host', argv: [...leading, ...words.slice(1)] };

  let spec: CommandSpec | undefined;
  let rest: string[];
  const group = groupAliases[first];
  if (group !== undefined) {
    const verbWord = words[1];
    if (verbWord === undefined || verbWord === '--help' || verbWord === '-h') {
      if (verbWord !== undefined) return { kind: 'help', text: groupHelp(group) };
      throw new UsageError(`'tarmac ${group}' needs a subcommand. See 'tarmac ${group} --help'.`);
    }
    // A group's own verb wins over an alias (`certs show` and `certs remove` are verbs of their own).
    spec = commands.find((c) => c.name === `${group} ${verbWord}`) ?? commands.find((c) => c.name === `${group} ${verbAliases[verbWord] ?? verbWord}`);
    if (!spec) throw new UsageError(`unknown command 'tarmac ${group} ${verbWord}'. See 'tarmac ${group} --help'.`);
    rest = words.slice(2);
  } else {
    spec = commands.find((c) => c.name === first);
    if (!spec) throw new UsageError(`unknown command '${first}'. See 'tarmac --help'.`);
    rest = words.slice(1);
  }
  return parseFor(spec, [...leading, ...rest], env);
}

type Values = Record<string, string | boolean | string[] | undefined>;

function parseFor(spec: CommandSpec, args: string[], env: Readonly<Record<string, string | undefined>>): ParseResult {
  const hint = `See 'tarmac ${spec.name} --help'.`;
  const flags = { ...globalFlags, ...spec.flags };
  const options: Record<string, { type: 'string' | 'boolean'; short?: string; multiple?: boolean }> = {};
  for (const [name, f] of Object.entries(flags)) {
    options[name] = { type: f.type, ...(f.short ? { short: f.short } : {}), ...(f.multiple ? { multiple: true } : {}) };
  }
  let values: Values;
  let positionals: string[];
  try {
    ({ values, positionals } = parseArgs({ args, options, strict: true, allowPositionals: true }) as { values: Values; positionals: string[] });
  } catch (e) {
    throw new UsageError(`${describeParseError(e)}. ${hint}`);
  }
  if (values['help'] === true) return { kind: 'help', text: commandHelp(spec) };

  const required = spec.args.filter((a) => a.required);
  if (positionals.length < required.length) {
    const missing = required.slice(positionals.length).map((a) => a.name).join(' ');
    throw new UsageError(`missing argument ${missing}. ${hint}`);
  }
  if (positionals.length > spec.args.length) {
    throw new UsageError(`unexpected argument '${positionals[spec.args.length]}'. ${hint}`);
  }

  const str = (k: string): string | undefined => {
    const v = values[k];
    if (typeof v !== 'string') return undefined;
    if (v === '') throw new UsageError(`flag --${k} needs a non-empty value. ${hint}`);
    return v;
  };
  const bool = (k: string): boolean => values[k] === true;
  const list = (k: string): string[] => (Array.isArray(values[k]) ? (values[k] as string[]) : []);
  const app = (): string => {
    const a = str('app') ?? (env['TARMAC_APP'] || undefined);
    if (a === undefined) throw new UsageError(`missing --app (-a): which app? ${hint}`);
    return a;
  };
  const usage = <T>(fn: () => T): T => {
    try {
      return fn();
    } catch (e) {
      if (e instanceof UsageError) throw new UsageError(`${e.message}. ${hint}`);
      throw e;
    }
  };
  const waitTimeout = (): number => {
    const v = str('wait-timeout');
    return v === undefined ? 300 : usage(() => parsePositiveInt(v, '--wait-timeout'));
  };
  const stopOpts = (): { signal?: string; timeout?: string | number } => {
    const out: { signal?: string; timeout?: string | number } = {};
    const s = str('signal');
    if (s !== undefined) out.signal = usage(() => parseSignal(s));
    const t = str('timeout');
    if (t !== undefined) out.timeout = usage(() => parseTimeout(t));
    return out;
  };

  const global: GlobalOptions = globalFrom({ apiUrl: str('api-url'), token: str('token'), json: bool('json') });
  const pos = (n: number): string => positionals[n]!;
  let command: Command;
  switch (spec.name) {
    case 'apps create': { const org = str('org'); command = { name: spec.name, app: pos(0), ...(org !== undefined ? { org } : {}) }; break; }
    case 'apps list': { const org = str('org'); command = org === undefined ? { name: spec.name } : { name: spec.name, org }; break; }
    case 'apps destroy': command = { name: spec.name, app: pos(0), yes: bool('yes') }; break;
    case 'machine run':
      command = {
        name: spec.name, app: app(), detach: bool('detach'), waitTimeout: waitTimeout(),
        request: usage(() => buildCreateRequest(pos(0), {
          ports: list('port'), env: list('env'), region: str('region'), name: str('name'), cpus: str('cpus'),
          memory: str('memory'), restart: str('restart'), cmd: str('cmd'), entrypoint: str('entrypoint'),
          autostart: str('autostart'), autostop: str('autostop'),
        })),
      };
      break;
    case 'machine list': command = { name: spec.name, app: app() }; break;
    case 'machine status': command = { name: spec.name, app: app(), id: pos(0) }; break;
    case 'machine start': command = { name: spec.name, app: app(), id: pos(0), detach: bool('detach'), waitTimeout: waitTimeout() }; break;
    case 'machine stop':
    case 'machine restart':
      command = { name: spec.name, app: app(), id: pos(0), ...stopOpts(), detach: bool('detach'), waitTimeout: waitTimeout() };
      break;
    case 'machine destroy': command = { name: spec.name, app: app(), id: pos(0), force: bool('force') }; break;
    case 'logs': {
      const machine = str('machine');
      command = { name: spec.name, app: app(), follow: bool('follow'), ...(machine !== undefined ? { machine } : {}) };
      break;
    }
    case 'status':
      if (bool('hosts')) {
        if (str('app') !== undefined) throw new UsageError(`--hosts shows the whole fleet and takes no --app. ${hint}`);
        command = { name: spec.name, hosts: true };
      } else {
        command = { name: spec.name, app: app() };
      }
      break;
    case 'certs add': {
      const fullchain = str('fullchain');
      const privateKey = str('private-key');
      if (fullchain === undefined || privateKey === undefined) throw new UsageError(`certs add needs --fullchain FILE and --private-key FILE. ${hint}`);
      command = { name: spec.name, app: app(), hostname: pos(0), fullchain, privateKey };
      break;
    }
    case 'certs list': command = { name: spec.name, app: app() }; break;
    case 'certs show':
    case 'certs remove': command = { name: spec.name, app: app(), hostname: pos(0) }; break;
    case 'certs request': command = { name: spec.name, app: app(), hostname: pos(0), wait: bool('wait') }; break;
    case 'ips allocate-v4':
    case 'ips allocate-v6': {
      const region = str('region');
      command = { name: spec.name, app: app(), ...(region !== undefined ? { region } : {}) };
      break;
    }
    case 'ips list': command = { name: spec.name, app: app() }; break;
    case 'ips release': command = { name: spec.name, app: app(), ip: pos(0) }; break;
    case 'wireguard create': {
      const gateway = str('gateway');
      command = { name: spec.name, org: pos(0), peer: pos(1), ...(gateway !== undefined ? { gateway } : {}) };
      break;
    }
    case 'version': command = { name: spec.name }; break;
  }
  if (global.apiUrl !== undefined) usage(() => checkApiUrl(global.apiUrl!));
  return { kind: 'run', command, global };
}

function globalFrom(v: { apiUrl?: string | undefined; token?: string | undefined; json?: boolean }): GlobalOptions {
  const g: GlobalOptions = { json: v.json ?? false };
  if (v.apiUrl !== undefined) g.apiUrl = v.apiUrl;
  if (v.token !== undefined) g.token = v.token;
  return g;
}

/** Turns node:util parseArgs errors (several sentences, quoting our spec) into one short clause. */
function describeParseError(e: unknown): string {
  const msg = e instanceof Error ? e.message : String(e);
  const code = (e as { code?: string }).code;
  const flag = /'(?:-\w, )?(--?[\w-]+)/.exec(msg)?.[1] ?? '';
  if (code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION') return `unknown flag ${flag}`;
  if (code === 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE') {
    if (msg.includes('does not take an argument')) return `flag ${flag} takes no value`;
    if (msg.includes('ambiguous')) return `flag ${flag} needs a value (write ${flag}=VALUE for a value that starts with '-')`;
    return `flag ${flag} needs a value`;
  }
  return msg.split('\n')[0]!.replace(/\.$/, '');
}

export function checkApiUrl(url: string): void {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new UsageError(`--api-url '${url}' is not a URL (like http://127.0.0.1:4280)`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new UsageError(`--api-url '${url}' must be an http:// or https:// URL`);
}

// ---- value parsers (pure; they throw UsageError without the help hint) ----

export function parsePositiveInt(v: string, flag: string): number {
  if (!/^\d+$/.test(v) || Number(v) < 1) throw new UsageError(`${flag} must be a positive whole number, not '${v}'`);
  return Number(v);
}

/** "512", "512mb", "1gb", "1.5g" → megabytes. */
export function parseMemoryMb(v: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(m|mb|mib|g|gb|gib)?$/i.exec(v.trim());
  if (!m) throw new UsageError(`--memory must be megabytes like 256 or a size like 1gb, not '${v}'`);
  const n = Number(m[1]) * (m[2] && m[2].toLowerCase().startsWith('g') ? 1024 : 1);
  if (!Number.isInteger(n) || n < 16) throw new UsageError(`--memory must be a whole number of megabytes, at least 16, not '${v}'`);
  return n;
}

const signalNames = ['SIGABRT', 'SIGALRM', 'SIGFPE', 'SIGHUP', 'SIGILL', 'SIGINT', 'SIGKILL', 'SIGPIPE', 'SIGQUIT', 'SIGSEGV', 'SIGTERM', 'SIGTRAP', 'SIGUSR1', 'SIGUSR2'];

/** "term", "TERM", "SIGTERM" → "SIGTERM". */
export function parseSignal(v: string): string {
  const up = v.toUpperCase();
  const name = up.startsWith('SIG') ? up : `SIG${up}`;
  if (!signalNames.includes(name)) throw new UsageError(`--signal must be one of ${signalNames.join(', ')}, not '${v}'`);
  return name;
}

/** Seconds as a number, or a Go duration such as "30s" or "1m30s" passed through. */
export function parseTimeout(v: string): string | number {
  if (/^\d+$/.test(v)) return Number(v);
  if (/^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$/.test(v)) return v;
  throw new UsageError(`--timeout must be seconds or a duration like 30s, not '${v}'`);
}

const handlerNames = ['http', 'tls', 'proxy_proto', 'pg_tls', 'edge_http'] as const;
type Handler = (typeof handlerNames)[number];
type Service = NonNullable<MachineConfig['services']>[number];

function parsePortNumber(v: string, spec: string): number {
  if (!/^\d+$/.test(v) || Number(v) < 1 || Number(v) > 65535) throw new UsageError(`--port '${spec}': '${v}' is not a port number (1-65535)`);
  return Number(v);
}

/**
 * Parses flyctl's `port[:internal_port][/protocol][:handler[:handler…]]` (handlers may also be
 * comma-separated). The internal port defaults to the public one, the protocol to tcp.
 */
export function parsePortSpec(spec: string): { port: number; internal_port: number; protocol: 'tcp' | 'udp'; handlers: Handler[] } {
  const slash = spec.split('/');
  if (slash.length > 2) throw new UsageError(`--port '${spec}' has more than one '/': expected PORT[:INTERNAL][/PROTO][:HANDLER]`);
  const portParts = slash[0]!.split(':');
  if (portParts.length > 2 || portParts[0] === '') throw new UsageError(`--port '${spec}': expected PORT[:INTERNAL][/PROTO][:HANDLER], like 80:8080/tcp:http`);
  const port = parsePortNumber(portParts[0]!, spec);
  const internal_port = portParts[1] === undefined ? port : parsePortNumber(portParts[1], spec);
  let protocol: 'tcp' | 'udp' = 'tcp';
  const handlers: Handler[] = [];
  if (slash[1] !== undefined) {
    const [proto, ...hs] = slash[1].split(':');
    const p = (proto ?? '').toLowerCase();
    if (p !== 'tcp' && p !== 'udp') throw new UsageError(`--port '${spec}': protocol must be tcp or udp, not '${proto}'`);
    protocol = p;
    for (const h of hs.flatMap((x) => x.split(','))) {
      const name = h.toLowerCase();
      if (!(handlerNames as readonly string[]).includes(name)) throw new UsageError(`--port '${spec}': unknown handler '${h}' (expected ${handlerNames.join(', ')})`);
      if (protocol === 'udp') throw new UsageError(`--port '${spec}': udp ports take no handlers`);
      if (!handlers.includes(name as Handler)) handlers.push(name as Handler);
    }
  }
  return { port, internal_port, protocol, handlers };
}

/** Groups --port values into Fly services: one service per (protocol, internal port), as flyctl does. */
export function portsToServices(specs: readonly string[]): Service[] {
  const services: Service[] = [];
  for (const s of specs) {
    const p = parsePortSpec(s);
    let svc = services.find((x) => x.protocol === p.protocol && x.internal_port === p.internal_port);
    if (!svc) {
      svc = { protocol: p.protocol, internal_port: p.internal_port, ports: [] };
      services.push(svc);
    }
    if (svc.ports!.some((x) => x.port === p.port)) throw new UsageError(`--port ${p.port}/${p.protocol} is given twice`);
    svc.ports!.push(p.handlers.length > 0 ? { port: p.port, handlers: p.handlers } : { port: p.port });
  }
  return services;
}

/** flyctl's `--autostart` value: true or false. */
export function parseAutostart(v: string): boolean {
  const b = v.toLowerCase();
  if (b !== 'true' && b !== 'false') throw new UsageError(`--autostart must be true or false, not '${v}'`);
  return b === 'true';
}

/** flyctl's `--autostop` value: off, stop or suspend, with true meaning stop and false off. */
export function parseAutostop(v: string): 'off' | 'stop' | 'suspend' {
  const m = v.toLowerCase();
  if (m === 'off' || m === 'false') return 'off';
  if (m === 'stop' || m === 'true') return 'stop';
  if (m === 'suspend') return 'suspend';
  throw new UsageError(`--autostop must be off, stop or suspend (or true/false), not '${v}'`);
}

/** K=V pairs (value may contain '='; later ones win). */
export function parseEnvPairs(pairs: readonly string[]): Record<string, string> {
  const env: Record<string, string> = {};
  for (const pair of pairs) {
    const eq = pair.indexOf('=');
    if (eq < 0) throw new UsageError(`--env '${pair}' must look like NAME=VALUE`);
    const name = pair.slice(0, eq);
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) throw new UsageError(`--env '${pair}': '${name}' is not a valid variable name`);
    env[name] = pair.slice(eq + 1);
  }
  return env;
}

/** Splits a command string like a POSIX shell would split words: quotes and backslashes, no expansion. */
export function splitCommand(s: string, flag = '--cmd'): string[] {
  const words: string[] = [];
  let cur = '';
  let inWord = false;
  let quote: '"' | "'" | undefined;
  for (let i = 0; i < s.length; i++) {
    const c = s[i]!;
    if (quote === "'") {
      if (c === "'") quote = undefined;
      else cur += c;
    } else if (quote === '"') {
      if (c === '"') quote = undefined;
      else if (c === '\\' && i + 1 < s.length && '"\\$`'.includes(s[i + 1]!)) cur += s[++i];
      else cur += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      inWord = true;
    } else if (c === '\\' && i + 1 < s.length) {
      cur += s[++i];
      inWord = true;
    } else if (/\s/.test(c)) {
      if (inWord) words.push(cur);
      cur = '';
      inWord = false;
    } else {
      cur += c;
      inWord = true;
    }
  }
  if (quote) throw new UsageError(`${flag} has an unclosed ${quote} quote`);
  if (inWord) words.push(cur);
  if (words.length === 0) throw new UsageError(`${flag} is empty`);
  return words;
}

export interface RunFlags {
  ports: readonly string[];
  env: readonly string[];
  region?: string | undefined;
  name?: string | undefined;
  cpus?: string | undefined;
  memory?: string | undefined;
  restart?: string | undefined;
  cmd?: string | undefined;
  entrypoint?: string | undefined;
  autostart?: string | undefined;
  autostop?: string | undefined;
}

/** Builds the body of `POST /v1/apps/{app}/machines` from `machine run` flags. */
export function buildCreateRequest(image: string, f: RunFlags): CreateMachineRequest {
  const config: MachineConfig = { image };
  if (f.env.length > 0) config.env = parseEnvPairs(f.env);
  if (f.ports.length > 0) config.services = portsToServices(f.ports);
  // As flyctl: set on every service the --port flags make, and only when given (unset means Fly's defaults).
  const autostart = f.autostart === undefined ? undefined : parseAutostart(f.autostart);
  const autostop = f.autostop === undefined ? undefined : parseAutostop(f.autostop);
  if (autostart !== undefined || autostop !== undefined) {
    const flag = autostart !== undefined ? '--autostart' : '--autostop';
    if (config.services === undefined) throw new UsageError(`${flag} applies to the services --port publishes: add a --port`);
    for (const svc of config.services) {
      if (autostart !== undefined) svc.autostart = autostart;
      if (autostop !== undefined) svc.autostop = autostop;
    }
  }
  if (f.cpus !== undefined || f.memory !== undefined) {
    config.guest = {};
    if (f.cpus !== undefined) config.guest.cpus = parsePositiveInt(f.cpus, '--cpus');
    if (f.memory !== undefined) config.guest.memory_mb = parseMemoryMb(f.memory);
  }
  if (f.restart !== undefined) {
    if (f.restart !== 'no' && f.restart !== 'always' && f.restart !== 'on-failure') throw new UsageError(`--restart must be no, always or on-failure, not '${f.restart}'`);
    config.restart = { policy: f.restart };
  }
  if (f.cmd !== undefined || f.entrypoint !== undefined) {
    config.init = {};
    if (f.cmd !== undefined) config.init.cmd = splitCommand(f.cmd, '--cmd');
    if (f.entrypoint !== undefined) config.init.entrypoint = splitCommand(f.entrypoint, '--entrypoint');
  }
  const req: CreateMachineRequest = { config };
  if (f.name !== undefined) req.name = f.name;
  if (f.region !== undefined) req.region = f.region;
  return req;
}

// ---- help ----

function usageLine(spec: CommandSpec): string {
  const args = spec.args.map((a) => (a.required ? a.name : `[${a.name}]`));
  const app = 'app' in spec.flags ? ['-a APP'] : [];
  return ['tarmac', spec.name, ...args, ...app, '[flags]'].join(' ');
}

function flagLines(flags: Record<string, FlagSpec>): string[] {
  const rows = Object.entries(flags).map(([name, f]) => {
    const left = `${f.short ? `-${f.short}, ` : '    '}--${name}${f.type === 'string' ? ` ${f.value ?? 'VALUE'}` : ''}`;
    return [left, f.description] as const;
  });
  const width = Math.max(...rows.map((r) => r[0].length));
  return rows.map(([l, d]) => `  ${l.padEnd(width)}  ${d}`);
}

export function commandHelp(spec: CommandSpec): string {
  const lines = [`${spec.summary}.`, '', 'Usage:', `  ${usageLine(spec)}`, ''];
  if (Object.keys(spec.flags).length > 0) lines.push('Flags:', ...flagLines(spec.flags), '');
  lines.push('Global flags:', ...flagLines(globalFlags), '');
  if (spec.examples) lines.push('Examples:', ...spec.examples.map((e) => `  ${e}`), '');
  return lines.join('\n');
}

function groupHelp(group: string): string {
  const specs = commands.filter((c) => c.name.startsWith(`${group} `));
  const width = Math.max(...specs.map((s) => s.name.length));
  return [
    `Usage: tarmac ${group} <command> [flags]`, '', 'Commands:',
    ...specs.map((s) => `  ${s.name.padEnd(width)}  ${s.summary}`),
    '', `Run 'tarmac ${group} <command> --help' for a command's flags.`, '',
  ].join('\n');
}

export function mainHelp(): string {
  const entries: Array<[string, string]> = [...commands.map((c) => [c.name, c.summary] as [string, string]), ['host', hostSummary]];
  const width = Math.max(...entries.map(([n]) => n.length));
  return [
    'tarmac: run apps as machines on your own hosts (a self-hosted, Fly.io-style platform).',
    '',
    'Usage: tarmac <command> [flags]',
    '',
    'Commands:',
    ...entries.map(([n, s]) => `  ${n.padEnd(width)}  ${s}`),
    '',
    'Global flags:',
    ...flagLines(globalFlags),
    '',
    "Run 'tarmac <command> --help' for a command's flags.",
    '',
  ].join('\n');
}

/** Help text for `tarmac help [words…]`. */
export function helpFor(words: readonly string[]): string {
  if (words.length === 0) return mainHelp();
  if (words[0] === 'host') return `${hostSummary}.\n\nUsage:\n  tarmac host [flags]\n`;
  const group = groupAliases[words[0]!];
  if (group !== undefined) {
    if (words[1] === undefined) return groupHelp(group);
    const verb = verbAliases[words[1]] ?? words[1];
    const spec = commands.find((c) => c.name === `${group} ${verb}`);
    if (!spec) throw new UsageError(`unknown command 'tarmac ${group} ${words[1]}'. See 'tarmac ${group} --help'.`);
    return commandHelp(spec);
  }
  const spec = commands.find((c) => c.name === words[0]);
  if (!spec) throw new UsageError(`unknown command '${words[0]}'. See 'tarmac --help'.`);
  return commandHelp(spec);
}
