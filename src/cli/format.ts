// Output for people: aligned tables, machine details, event and log lines; colour only on a terminal.
import type { AppResponse, ListHostsResponse, LogEntry, MachineEventResponse, MachineResponse } from '../client/index.ts';

export interface Style {
  color: boolean;
}

const codes = { bold: [1, 22], dim: [2, 22], red: [31, 39], green: [32, 39], yellow: [33, 39], cyan: [36, 39] } as const;
type Paint = keyof typeof codes;

export function paint(style: Style, what: Paint, s: string): string {
  if (!style.color) return s;
  const [on, off] = codes[what];
  return `\x1b[${on}m${s}\x1b[${off}m`;
}

/** Visible width of a string: ANSI escapes do not count. */
export function visibleLength(s: string): number {
  return s.replace(/\x1b\[[0-9;]*m/g, '').length;
}

/** Colour only when writing to a terminal and NO_COLOR is unset (FORCE_COLOR forces it). */
export function shouldColor(stream: { isTTY?: boolean }, env: Readonly<Record<string, string | undefined>>): boolean {
  if (env['NO_COLOR']) return false;
  if (env['FORCE_COLOR'] && env['FORCE_COLOR'] !== '0') return true;
  return stream.isTTY === true && env['TERM'] !== 'dumb';
}

/** Columns separated by two spaces, padded to the widest cell; headers in capitals. No trailing spaces. */
export function table(headers: readonly string[], rows: ReadonlyArray<readonly string[]>, style: Style): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => visibleLength(r[i] ?? ''))));
  const line = (cells: readonly string[]): string =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c + ' '.repeat(widths[i]! - visibleLength(c))))
      .join('  ')
      .trimEnd();
  return [paint(style, 'bold', line(headers.map((h) => h.toUpperCase()))), ...rows.map(line)].join('\n') + '\n';
}

/** "12s ago", "5m ago", "3h ago", "2d ago"; the timestamp itself when it cannot be read. */
export function ago(when: string | number, now: number = Date.now()): string {
  const t = typeof when === 'number' ? when : Date.parse(when);
  if (!Number.isFinite(t)) return String(when);
  const s = Math.max(0, Math.round((now - t) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

export function colorState(style: Style, state: string): string {
  if (state === 'started') return paint(style, 'green', state);
  if (state === 'failed') return paint(style, 'red', state);
  if (state === 'starting' || state === 'stopping' || state === 'replacing' || state === 'destroying' || state === 'created') return paint(style, 'yellow', state);
  return state;
}

/** The image a machine runs, as people write it: registry/repository:tag (or the configured reference). */
export function imageLabel(m: MachineResponse): string {
  const r = m.image_ref;
  if (!r) return m.config.image;
  const repo = r.registry ? `${r.registry}/${r.repository}` : r.repository;
  return r.tag ? `${repo}:${r.tag}` : r.digest ? `${repo}@${r.digest}` : repo;
}

/** "80→8080/tcp [http], 443→8080/tcp [http,tls]". */
export function servicesLabel(m: MachineResponse): string {
  const out: string[] = [];
  for (const s of m.config.services ?? []) {
    const ports = s.ports ?? [];
    if (ports.length === 0) out.push(`${s.internal_port}/${s.protocol}`);
    for (const p of ports) {
      const pub = p.port ?? (p.start_port !== undefined ? `${p.start_port}-${p.end_port ?? p.start_port}` : '?');
      const h = p.handlers && p.handlers.length > 0 ? ` [${p.handlers.join(',')}]` : '';
      out.push(`${pub}→${s.internal_port}/${s.protocol}${h}`);
    }
  }
  return out.join(', ');
}

export function appsTable(apps: readonly AppResponse[], style: Style, now = Date.now()): string {
  return table(
    ['name', 'org', 'status', 'machines', 'created'],
    apps.map((a) => [a.name, a.organization?.slug ?? '', a.status ?? '', String(a.machine_count ?? ''), ago(a.created_at, now)]),
    style,
  );
}

export function machinesTable(machines: readonly MachineResponse[], style: Style, now = Date.now()): string {
  return table(
    ['id', 'name', 'state', 'region', 'image', 'ip', 'updated'],
    machines.map((m) => [m.id, m.name, colorState(style, m.state), m.region, imageLabel(m), m.private_ip ?? '', ago(m.updated_at, now)]),
    style,
  );
}

/** "850ms", "4.2s", "3m10s": how stale a catalog copy is. */
export function staleLabel(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)}ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)}s`;
  const s = Math.round(ms / 1000);
  return s < 3600 ? `${Math.floor(s / 60)}m${s % 60}s` : `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
}

/** The fleet's hosts with their catalog copies; a copy behind or stale (over 3 s) is shown in yellow. */
export function hostsTable(res: ListHostsResponse, style: Style, now = Date.now()): string {
  const rows = res.hosts.map((h) => {
    const lag = h.lag === null ? '-' : h.lag > 0 ? paint(style, 'yellow', String(h.lag)) : '0';
    const stale = h.staleness_ms === null ? '-' : h.staleness_ms > 3000 ? paint(style, 'yellow', staleLabel(h.staleness_ms)) : staleLabel(h.staleness_ms);
    return [
      h.id, h.region, h.roles.join(','), String(h.machines), `${h.capacity.cpus} cpu ${h.capacity.memory_mb} MB`,
      h.revision === null ? '-' : String(h.revision), lag, stale, h.last_seen === null ? 'never' : ago(h.last_seen, now),
    ];
  });
  return table(['host', 'region', 'roles', 'machines', 'capacity', 'revision', 'lag', 'stale', 'last seen'], rows, style);
}

/** Short human text for an event's details (exit codes, pull progress, …) taken from its `request`. */
export function eventDetail(e: MachineEventResponse): string {
  const req = e.request;
  if (!req) return '';
  const exit = (req['exit_event'] ?? (e.type === 'exit' ? req : undefined)) as Record<string, unknown> | undefined;
  if (exit && typeof exit['exit_code'] === 'number') {
    const parts = [`exit code ${exit['exit_code']}`];
    if (exit['oom_killed'] === true) parts.push('OOM killed');
    if (typeof exit['signal'] === 'number' && exit['signal'] > 0) parts.push(`signal ${exit['signal']}`);
    if (exit['restarting'] === true) parts.push('restarting');
    return parts.join(', ');
  }
  const flat: string[] = [];
  for (const [k, v] of Object.entries(req)) {
    if (v === null || v === undefined) continue;
    if (typeof v !== 'string' && typeof v !== 'number' && typeof v !== 'boolean') continue;
    flat.push(k === 'message' || k === 'error' ? String(v) : `${k}=${formatValue(k, v)}`);
  }
  return flat.join(' ');
}

function formatValue(key: string, v: string | number | boolean): string {
  if (typeof v === 'number' && /bytes|size/i.test(key)) return formatBytes(v);
  return String(v);
}

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  if (n < 1024 ** 3) return `${(n / 1024 / 1024).toFixed(1)} MB`;
  return `${(n / 1024 ** 3).toFixed(2)} GB`;
}

function clock(ms: number): string {
  const d = new Date(ms);
  return Number.isFinite(d.getTime()) ? d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z') : String(ms);
}

export function eventsTable(events: readonly MachineEventResponse[], style: Style): string {
  return table(
    ['timestamp', 'type', 'status', 'source', 'detail'],
    events.map((e) => [clock(e.timestamp), e.type, e.status, e.source, eventDetail(e)]),
    style,
  );
}

/** The key/value block of `machine status`. */
export function machineDetails(m: MachineResponse, style: Style, now = Date.now()): string {
  const g = m.config.guest ?? {};
  const rows: Array<[string, string]> = [
    ['ID', m.id],
    ['Name', m.name],
    ['State', colorState(style, m.state) + (m.desired_state && m.desired_state !== m.state ? ` (desired: ${m.desired_state})` : '')],
    ['Region', m.region],
    ['Image', imageLabel(m)],
  ];
  if (m.image_ref?.digest) rows.push(['Digest', m.image_ref.digest]);
  rows.push(
    ['Private IP', m.private_ip ?? ''],
    ['Instance', m.instance_id + (m.version !== undefined ? ` (version ${m.version})` : '')],
    ['Guest', `${g.cpus ?? 1} ${g.cpu_kind ?? 'shared'} cpu, ${g.memory_mb ?? 256} MB`],
  );
  const svc = servicesLabel(m);
  if (svc) rows.push(['Services', svc]);
  if (m.config.restart?.policy) rows.push(['Restart', m.config.restart.policy + (m.config.restart.max_retries !== undefined ? ` (max ${m.config.restart.max_retries} retries)` : '')]);
  if (m.checks?.length) {
    const color = { passing: 'green', warning: 'yellow', critical: 'red' } as const;
    rows.push(['Checks', m.checks.map((c) => `${c.name} ${paint(style, color[c.status], c.status)}`).join(', ')]);
  }
  if (m.cordoned) rows.push(['Cordoned', 'yes']);
  if (m.host_status && m.host_status !== 'ok') rows.push(['Host', m.host_status]);
  rows.push(['Created', `${m.created_at} (${ago(m.created_at, now)})`], ['Updated', `${m.updated_at} (${ago(m.updated_at, now)})`]);
  const width = Math.max(...rows.map(([k]) => k.length));
  return rows.map(([k, v]) => `${paint(style, 'bold', k.padEnd(width))}  ${v}`).join('\n') + '\n';
}

export function appDetails(a: AppResponse, style: Style, now = Date.now()): string {
  const rows: Array<[string, string]> = [
    ['App', a.name],
    ['Organization', a.organization?.slug ?? ''],
    ['Status', a.status ?? ''],
    ['Network', a.network ?? ''],
    ['Created', `${new Date(a.created_at).toISOString()} (${ago(a.created_at, now)})`],
  ];
  const width = Math.max(...rows.map(([k]) => k.length));
  return rows.map(([k, v]) => `${paint(style, 'bold', k.padEnd(width))}  ${v}`).join('\n') + '\n';
}

/** "2024-05-01T12:00:00.123Z 3d8d9e1c2f4a5b hello" with stderr lines marked. */
export function logLine(e: LogEntry, style: Style): string {
  const stream = e.stream === 'stderr' ? `${paint(style, 'red', '[stderr]')} ` : '';
  return `${paint(style, 'dim', e.timestamp)} ${paint(style, 'cyan', e.machine_id)} ${stream}${e.message.replace(/\n$/, '')}\n`;
}
