// What each `tarmac` command does, over the typed API client only; loaded lazily so `--help` stays fast.
import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { createInterface } from 'node:readline/promises';
import { setTimeout as delay } from 'node:timers/promises';
import { ApiError, TarmacClient, type CreateAppRequest, type MachineEventResponse, type MachineResponse } from '../client/index.ts';
import { TarmacError } from '../shared/errors.ts';
import { UsageError, type Command, type GlobalOptions } from './args.ts';
import { resolveApiConfig } from './config.ts';
import {
  appDetails, appsTable, eventsTable, hostsTable, logLine, machineDetails, machinesTable, servicesLabel, shouldColor, type Style,
} from './format.ts';
import { Progress } from './progress.ts';
import { certDetails, certsTable } from './certs.ts';
import { ipsTable } from './ips.ts';
import { createWireguardPeer } from './wireguard.ts';

type OutStream = NodeJS.WritableStream & { isTTY?: boolean };

/** The process surroundings a command runs in (swappable in tests). */
export interface Io {
  stdout: OutStream;
  stderr: OutStream;
  stdin: NodeJS.ReadableStream & { isTTY?: boolean };
  env: Readonly<Record<string, string | undefined>>;
  cwd: string;
  /** Abort signal fired on Ctrl-C, for commands that run until interrupted. */
  interrupt: AbortSignal;
}

class Out {
  readonly style: Style;
  constructor(readonly io: Io, readonly json: boolean) {
    this.style = { color: shouldColor(io.stdout, io.env) };
  }
  /** Writes and waits for the stream to drain when it is full (log streams can be long). */
  async write(s: string): Promise<void> {
    if (!this.io.stdout.write(s)) await new Promise<void>((resolve) => this.io.stdout.once('drain', () => resolve()));
  }
  async doc(value: unknown): Promise<void> {
    await this.write(JSON.stringify(value ?? null, null, 2) + '\n');
  }
}

/** Runs one parsed command against the API; returns the exit code. Expected failures are thrown as TarmacError/UsageError. */
export async function runCommand(cmd: Command, global: GlobalOptions, io: Io): Promise<number> {
  const api = resolveApiConfig(global, io.env, io.cwd);
  const client = new TarmacClient({ baseUrl: api.url, token: api.token });
  const out = new Out(io, global.json);
  try {
    return await dispatch(cmd, client, out);
  } catch (e) {
    throw explain(e, api.url, cmd);
  }
}

/** Turns API failures into one actionable sentence. */
function explain(e: unknown, url: string, cmd: Command): unknown {
  if (!(e instanceof ApiError)) return e;
  if (e.status === 0) return new TarmacError('unavailable', `cannot reach the Tarmac API at ${url}: is \`npm start\` running?`, { cause: e });
  let message = e.message;
  if (e.status === 401) message += ' (check --token or TARMAC_API_TOKEN)';
  if (cmd.name === 'machine destroy' && !cmd.force && (e.status === 412 || e.status === 409)) {
    message = /force/i.test(message) ? message.replace(/\bforce=true\b/, '--force') : `${message} (use --force to destroy a running machine)`;
  }
  return new ApiError(e.status, message, e.code, { cause: e });
}

async function dispatch(cmd: Command, client: TarmacClient, out: Out): Promise<number> {
  const { style } = out;
  switch (cmd.name) {
    case 'apps create': {
      // Without --org the API picks the token's organization (personal for the admin token).
      const body = (cmd.org !== undefined ? { app_name: cmd.app, org_slug: cmd.org } : { app_name: cmd.app }) as CreateAppRequest;
      const app = await client.createApp(body);
      if (out.json) await out.doc(app);
      else await out.write(`Created app ${cmd.app} in organization ${app?.organization?.slug ?? cmd.org ?? 'personal'}\n`);
      return 0;
    }
    case 'apps list': {
      const res = await client.listApps(cmd.org);
      if (out.json) await out.doc(res);
      else if (res.apps.length === 0) await out.write(`No apps yet: create one with 'tarmac apps create NAME'\n`);
      else await out.write(appsTable(res.apps, style));
      return 0;
    }
    case 'apps destroy': {
      if (!cmd.yes) {
        if (!out.io.stdin.isTTY || !out.io.stdout.isTTY) {
          throw new UsageError(`destroying app ${cmd.app} needs --yes when not run from a terminal. See 'tarmac apps destroy --help'.`);
        }
        if (!(await confirm(out.io, `Destroy app ${cmd.app} and all its machines? [y/N] `))) {
          await out.write('Not destroyed\n');
          return 1;
        }
      }
      await client.deleteApp(cmd.app);
      if (out.json) await out.doc({ ok: true });
      else await out.write(`Destroyed app ${cmd.app}\n`);
      return 0;
    }
    case 'certs add': {
      const read = (file: string, flag: string) => readFile(resolve(out.io.cwd, file), 'utf8').catch((e: unknown) => {
        throw new UsageError(`cannot read ${flag} ${file}: ${(e as Error).message}`);
      });
      const cert = await client.addCustomCertificate(cmd.app, {
        hostname: cmd.hostname, fullchain: await read(cmd.fullchain, '--fullchain'), private_key: await read(cmd.privateKey, '--private-key'),
      });
      if (out.json) await out.doc(cert);
      else await out.write(`Added certificate for ${cert.hostname} to app ${cmd.app} (valid until ${cert.not_after})\n`);
      return 0;
    }
    case 'certs list': {
      const res = await client.listCertificates(cmd.app);
      if (out.json) await out.doc(res);
      else if (res.certificates.length === 0) await out.write(`No certificates: add one with 'tarmac certs add HOSTNAME -a ${cmd.app} --fullchain FILE --private-key FILE'\n`);
      else await out.write(certsTable(res.certificates, style));
      return 0;
    }
    case 'certs show': {
      const cert = await client.getCertificate(cmd.app, cmd.hostname);
      if (out.json) await out.doc(cert);
      else await out.write(certDetails(cert, style));
      return 0;
    }
    case 'certs remove': {
      await client.deleteCertificate(cmd.app, cmd.hostname);
      if (out.json) await out.doc({ ok: true });
      else await out.write(`Removed the certificate for ${cmd.hostname} from app ${cmd.app}\n`);
      return 0;
    }
    case 'certs request': {
      let cert = await client.requestAcmeCertificate(cmd.app, cmd.hostname);
      while (cmd.wait && cert.status === 'pending' && !out.io.interrupt.aborted) {
        await delay(1_000);
        cert = await client.getCertificate(cmd.app, cmd.hostname);
      }
      if (out.json) await out.doc(cert);
      else if (cert.status === 'issued') await out.write(`Issued a certificate for ${cert.hostname} to app ${cmd.app} (valid until ${cert.not_after}; renewed automatically)\n`);
      else if (cert.status === 'pending') await out.write(`Requested a certificate for ${cert.hostname} (pending): see 'tarmac certs show ${cert.hostname} -a ${cmd.app}'\n`);
      if (cert.status !== 'failed') return 0;
      if (out.json) return 1;
      throw new TarmacError('failed_precondition', `the ACME order for ${cert.hostname} failed: ${cert.error ?? 'no reason given'}`);
    }
    case 'ips allocate-v4':
    case 'ips allocate-v6': {
      const ip = await client.allocateIp(cmd.app, { type: cmd.name === 'ips allocate-v4' ? 'v4' : 'v6', ...(cmd.region !== undefined ? { region: cmd.region } : {}) });
      if (out.json) await out.doc(ip);
      else await out.write(`Allocated ${ip.ip} to app ${cmd.app}\n`);
      return 0;
    }
    case 'ips list': {
      const res = await client.listIps(cmd.app);
      if (out.json) await out.doc(res);
      else if (res.ips.length === 0) await out.write(`No addresses: allocate one with 'tarmac ips allocate-v4 -a ${cmd.app}'\n`);
      else await out.write(ipsTable(res.ips, style));
      return 0;
    }
    case 'ips release': {
      await client.releaseIp(cmd.app, cmd.ip);
      if (out.json) await out.doc({ ok: true });
      else await out.write(`Released ${cmd.ip} from app ${cmd.app}\n`);
      return 0;
    }
    case 'wireguard create': {
      const { peer, config } = await createWireguardPeer(client, cmd.org, cmd.peer, cmd.gateway);
      if (out.json) await out.doc({ ...peer, config });
      else await out.write(config);
      return 0;
    }
    case 'machine run': return machineRun(cmd, client, out);
    case 'machine list': {
      const machines = await client.listMachines(cmd.app);
      if (out.json) await out.doc(machines);
      else if (machines.length === 0) await out.write(`No machines in app ${cmd.app}\n`);
      else await out.write(machinesTable(machines, style));
      return 0;
    }
    case 'machine status': {
      const m = await client.getMachine(cmd.app, cmd.id);
      if (out.json) {
        await out.doc(m);
        return 0;
      }
      await out.write(machineDetails(m, style));
      const events = [...(m.events ?? [])].sort((a, b) => b.timestamp - a.timestamp).slice(0, 10);
      await out.write(events.length > 0 ? `\nRecent events\n${eventsTable(events, style)}` : '\nNo events\n');
      return 0;
    }
    case 'machine start': {
      const res = await client.startMachine(cmd.app, cmd.id);
      if (!cmd.detach) await waitState(client, cmd.app, cmd.id, 'started', cmd.waitTimeout);
      if (out.json) await out.doc(res);
      else await out.write(cmd.detach ? `Machine ${cmd.id} is starting\n` : `Machine ${cmd.id} started\n`);
      return 0;
    }
    case 'machine stop': {
      const before = cmd.detach ? undefined : await client.getMachine(cmd.app, cmd.id);
      const res = await client.stopMachine(cmd.app, cmd.id, stopOptions(cmd));
      if (before) await waitState(client, cmd.app, cmd.id, 'stopped', cmd.waitTimeout, before.instance_id);
      if (out.json) await out.doc(res);
      else await out.write(cmd.detach ? `Machine ${cmd.id} is stopping\n` : `Machine ${cmd.id} stopped\n`);
      return 0;
    }
    case 'machine restart': {
      // A restart keeps the instance and the machine is `started` before and after: waiting for the state
      // would return at once. What marks this restart done is a `start started` event after its request.
      const before = cmd.detach ? undefined : new Set((await client.listEvents(cmd.app, cmd.id)).map((e) => e.id));
      const res = await client.restartMachine(cmd.app, cmd.id, stopOptions(cmd));
      if (before) {
        const progress = out.json ? undefined : newProgress(out);
        await followRestart(client, cmd.app, cmd.id, before, cmd.waitTimeout, progress);
        await progress?.end();
      }
      if (out.json) await out.doc(res);
      else await out.write(cmd.detach ? `Machine ${cmd.id} is restarting\n` : `Machine ${cmd.id} restarted\n`);
      return 0;
    }
    case 'machine destroy': {
      const res = await client.deleteMachine(cmd.app, cmd.id, { force: cmd.force });
      if (out.json) await out.doc(res ?? { ok: true });
      else await out.write(`Destroyed machine ${cmd.id}\n`);
      return 0;
    }
    case 'logs': return logs(cmd, client, out);
    case 'status': {
      if (cmd.hosts) {
        const res = await client.listHosts();
        if (out.json) await out.doc(res);
        else if (res.hosts.length === 0) await out.write('No hosts are registered\n');
        else await out.write(hostsTable(res, style));
        return 0;
      }
      const [app, machines] = await Promise.all([client.getApp(cmd.app), client.listMachines(cmd.app)]);
      if (out.json) {
        await out.doc({ app, machines });
        return 0;
      }
      await out.write(appDetails(app, style) + '\n');
      await out.write(machines.length > 0 ? machinesTable(machines, style) : `No machines: create one with 'tarmac machine run IMAGE -a ${cmd.app}'\n`);
      return 0;
    }
    case 'version':
      throw new Error('version is answered without the API');
  }
}

function stopOptions(cmd: { signal?: string; timeout?: string | number }): { signal?: string; timeout?: string | number } {
  const o: { signal?: string; timeout?: string | number } = {};
  if (cmd.signal !== undefined) o.signal = cmd.signal;
  if (cmd.timeout !== undefined) o.timeout = cmd.timeout;
  return o;
}

async function confirm(io: Io, question: string): Promise<boolean> {
  const rl = createInterface({ input: io.stdin, output: io.stdout });
  try {
    const answer = await new Promise<string | undefined>((resolve) => {
      rl.once('SIGINT', () => resolve(undefined));
      rl.once('close', () => resolve(undefined));
      rl.question(question).then(resolve, () => resolve(undefined));
    });
    if (answer === undefined) io.stdout.write('\n');
    return answer !== undefined && /^y(es)?$/i.test(answer.trim());
  } finally {
    rl.close();
  }
}

/** Waits through the API's `/wait` in slices (it allows 300 s at most per call) until `timeoutS` runs out. */
async function waitState(
  client: TarmacClient, app: string, id: string, state: 'started' | 'stopped', timeoutS: number, instance_id?: string,
): Promise<void> {
  const deadline = Date.now() + timeoutS * 1000;
  for (;;) {
    const left = Math.ceil((deadline - Date.now()) / 1000);
    if (left <= 0) break;
    try {
      await client.waitMachine(app, id, { state, timeout: Math.min(left, 60), ...(instance_id ? { instance_id } : {}) });
      return;
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 408) throw e;
    }
  }
  throw new TarmacError('timeout', `machine ${id} did not reach ${state} within ${timeoutS}s: see 'tarmac machine status ${id} -a ${app}'`);
}

type RunCommand = Extract<Command, { name: 'machine run' }>;

async function machineRun(cmd: RunCommand, client: TarmacClient, out: Out): Promise<number> {
  const created = await client.createMachine(cmd.app, cmd.request);
  if (!out.json) await out.write(`Machine ${created.id} (${created.name}) created in app ${cmd.app}, region ${created.region}\n`);
  if (cmd.detach) {
    if (out.json) await out.doc(created);
    else await out.write(`Follow it with 'tarmac machine status ${created.id} -a ${cmd.app}'\n`);
    return 0;
  }
  const progress = out.json ? undefined : newProgress(out);
  const final = await followStart(client, cmd.app, created, cmd.waitTimeout, progress);
  await progress?.end();
  if (out.json) {
    await out.doc(final);
    return 0;
  }
  const svc = servicesLabel(final);
  await out.write(`Machine ${final.id} is started${final.private_ip ? ` at ${final.private_ip}` : ''}${svc ? `, serving ${svc}` : ''}\n`);
  return 0;
}

const pollMs = 200;

function newProgress(out: Out): Progress {
  return new Progress((s) => out.write(s), out.io.stdout.isTTY === true, out.style);
}

function byTime(a: MachineEventResponse, b: MachineEventResponse): number {
  return a.timestamp - b.timestamp || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
}

/**
 * Waits for the restart requested just after `before` (the ids of the events that existed then) to finish:
 * the API records a `restart` event; the restart is done at the first `start started` event at or after it,
 * and failed at a `failed` event after it. Prints the new events as progress.
 */
async function followRestart(
  client: TarmacClient, app: string, id: string, before: ReadonlySet<string>, timeoutS: number, progress: Progress | undefined,
): Promise<void> {
  const deadline = Date.now() + timeoutS * 1000;
  const seen = new Set(before);
  let marker: MachineEventResponse | undefined;
  for (;;) {
    const fresh = (await client.listEvents(app, id)).filter((e) => !seen.has(e.id)).sort(byTime);
    for (const e of fresh) {
      seen.add(e.id);
      if (!marker && e.type === 'restart') {
        marker = e;
        continue;
      }
      await progress?.event(e);
      if (!marker || e.timestamp < marker.timestamp) continue;
      if (e.type === 'start' && e.status === 'started') return;
      if (e.type === 'failed' || e.status === 'failed' || e.status === 'destroyed') {
        await progress?.end();
        const detail = typeof e.request?.['error'] === 'string' ? ` (${e.request['error']})` : '';
        throw new TarmacError('failed_precondition', `machine ${id} did not restart: it is ${e.status}${detail}: see 'tarmac machine status ${id} -a ${app}'`);
      }
    }
    if (Date.now() >= deadline) {
      await progress?.end();
      const m = await client.getMachine(app, id);
      throw new TarmacError('timeout', `machine ${id} did not restart within ${timeoutS}s (state ${m.state}): see 'tarmac machine status ${id} -a ${app}'`);
    }
    await delay(pollMs);
  }
}

/** Polls the machine until it is started, printing its new events; fails when it cannot get there. */
async function followStart(
  client: TarmacClient, app: string, created: MachineResponse, timeoutS: number, progress: Progress | undefined,
): Promise<MachineResponse> {
  const deadline = Date.now() + timeoutS * 1000;
  const seen = new Set<string>();
  let m = created;
  // A machine's JSON carries only its latest few events; /events has the whole recent history (pull progress too).
  let events = created.events ?? [];
  for (;;) {
    const byId = new Map([...events, ...(m.events ?? [])].map((e) => [e.id, e] as const));
    const fresh = [...byId.values()].filter((e) => !seen.has(e.id)).sort(byTime);
    for (const e of fresh) {
      seen.add(e.id);
      await progress?.event(e);
    }
    if (m.state === 'started') return m;
    if (m.state === 'failed' || m.state === 'destroyed' || (m.state === 'stopped' && !restarting(m))) {
      await progress?.end();
      const why = lastFailure(m);
      // A process that ran and exited says why in its logs; a machine that never started (pull, runtime) does not.
      const see = latest(m, ['exit', 'failed'])?.type === 'exit' ? `tarmac logs -a ${app} --machine ${m.id}` : `tarmac machine status ${m.id} -a ${app}`;
      throw new TarmacError('failed_precondition', `machine ${m.id} is ${m.state}${why ? ` (${why})` : ''}: see '${see}'`);
    }
    if (Date.now() >= deadline) {
      await progress?.end();
      throw new TarmacError('timeout', `machine ${m.id} did not start within ${timeoutS}s (state ${m.state}): see 'tarmac machine status ${m.id} -a ${app}'`);
    }
    await delay(pollMs);
    [m, events] = await Promise.all([client.getMachine(app, created.id), client.listEvents(app, created.id)]);
  }
}

function latest(m: MachineResponse, types: readonly string[]): MachineEventResponse | undefined {
  return [...(m.events ?? [])].filter((e) => types.includes(e.type)).sort((a, b) => b.timestamp - a.timestamp)[0];
}

/** Whether a stopped machine is about to be restarted by its policy. */
function restarting(m: MachineResponse): boolean {
  const exit = latest(m, ['exit']);
  const info = (exit?.request?.['exit_event'] ?? exit?.request) as Record<string, unknown> | undefined;
  if (info && typeof info['restarting'] === 'boolean') return info['restarting'];
  const policy = m.config.restart?.policy;
  return policy === 'always' || policy === 'on-failure';
}

function lastFailure(m: MachineResponse): string {
  const e = latest(m, ['exit', 'failed']);
  if (!e) return '';
  const info = (e.request?.['exit_event'] ?? e.request) as Record<string, unknown> | undefined;
  if (info && typeof info['exit_code'] === 'number') return `exit code ${info['exit_code']}${info['oom_killed'] === true ? ', OOM killed' : ''}`;
  const msg = info?.['error'] ?? info?.['message'];
  return typeof msg === 'string' ? msg : e.status;
}

type LogsCommand = Extract<Command, { name: 'logs' }>;

async function logs(cmd: LogsCommand, client: TarmacClient, out: Out): Promise<number> {
  const opts: { machine_id?: string; follow?: boolean; signal?: AbortSignal } = { follow: cmd.follow, signal: out.io.interrupt };
  if (cmd.machine !== undefined) opts.machine_id = cmd.machine;
  try {
    for await (const entry of client.logs(cmd.app, opts)) {
      await out.write(out.json ? JSON.stringify(entry) + '\n' : logLine(entry, out.style));
    }
  } catch (e) {
    if (out.io.interrupt.aborted) return 0;
    throw e;
  }
  return 0;
}
