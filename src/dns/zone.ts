// The `.internal` zone in memory: orgs, apps and started machines kept current from catalog change batches, and Fly's name forms resolved against it.
import packet from 'dns-packet';
import { machineStarted, type App, type CatalogReader, type ChangeBatch, type MachineSpec, type MachineStatus } from '../catalog/index.ts';
import { ipv6Key } from './address.ts';
import { qtypes, rcode } from './wire.ts';

/** Seconds every `.internal` answer (and the negative-caching SOA minimum) may be cached. */
export const internalTtl = 5;
export const zoneName = 'internal';

/** Who asks: the organization whose names they see (undefined: every org, for trusted sources) and their region. */
export interface View {
  org: string | undefined;
  region: string;
}

/** A resolved question: the code and the records, ready to encode. */
export interface Resolution {
  rcode: number;
  answers: packet.Answer[];
  /** True for NXDOMAIN and NODATA: the zone's SOA goes in the authority section. */
  negative: boolean;
}

/** Names precompiled for an engine: their records, and the names that exist without records. */
export interface PrecompiledNames {
  records: Map<string, packet.Answer[]>;
  empty: string[];
}

/** A started machine as DNS shows it. */
interface Instance {
  id: string;
  app: string;
  region: string;
  ip: string;
  group: string;
}

interface MachineRow {
  spec: MachineSpec | undefined;
  status: MachineStatus | undefined;
}

/** The catalog reads the zone needs: a full load, then change batches. */
export type ZoneSource = Pick<CatalogReader, 'listOrgs' | 'listApps' | 'listMachines' | 'listHosts' | 'subscribe'>;

const addressKey = (a: string) => ipv6Key(a) ?? a;
const byId = (a: Instance, b: Instance) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);

/**
 * Fleet state as the DNS server sees it. Change batches update the rows and bump `generation`; the started
 * instances of an app are recomputed only when one of its machines changed.
 */
export class Zone {
  readonly #orgsByNetwork = new Map<number, string>();
  readonly #orgNetwork = new Map<string, number>();
  readonly #apps = new Map<string, App>();
  readonly #machines = new Map<string, MachineRow>();
  readonly #appMachines = new Map<string, Set<string>>();
  /** Machines by private address (addressKey), for the asker's region. */
  readonly #byAddress = new Map<string, string>();
  readonly #hosts = new Set<string>();
  /** Started instances of an app on a registered host, sorted by id; dropped when the app's machines change. */
  readonly #instances = new Map<string, Instance[]>();
  /** Lists dropped because a machine or host changed: kept when recomputed equal, so `appToken` stays the same. */
  readonly #stale = new Map<string, Instance[]>();
  #generation = 0;

  constructor(source: ZoneSource) {
    for (const o of source.listOrgs()) this.#putOrg(o.slug, o.network_id);
    for (const a of source.listApps()) this.#apps.set(a.name, a);
    for (const h of source.listHosts()) this.#hosts.add(h.id);
    for (const m of source.listMachines({ include_deleted: true })) {
      this.#row(m.spec.id, m.spec.app).spec = m.spec;
      this.#row(m.spec.id, m.spec.app).status = m.status;
      this.#byAddress.set(addressKey(m.spec.private_ip), m.spec.id);
    }
  }

  /** Increments on every change that can alter an answer; answer caches compare it. */
  get generation(): number {
    return this.#generation;
  }

  /** Applies one committed batch. */
  apply(batch: ChangeBatch): void {
    let changed = false;
    for (const c of batch.changes) {
      switch (c.kind) {
        case 'org': {
          const old = this.#orgNetwork.get(c.key);
          if (old !== undefined) this.#orgsByNetwork.delete(old);
          this.#orgNetwork.delete(c.key);
          if (c.op === 'put' && c.value) this.#putOrg(c.key, c.value.network_id);
          break;
        }
        case 'app':
          if (c.op === 'put' && c.value) this.#apps.set(c.key, c.value);
          else this.#apps.delete(c.key);
          this.#instances.delete(c.key); // a new token: the app's row changed
          this.#stale.delete(c.key);
          break;
        case 'host':
          if (c.op === 'put') this.#hosts.add(c.key);
          else this.#hosts.delete(c.key);
          for (const [app, list] of this.#instances) this.#stale.set(app, list);
          this.#instances.clear();
          break;
        case 'machine_spec':
        case 'machine_status': {
          const app = c.value?.app ?? this.#machines.get(c.key)?.spec?.app ?? this.#machines.get(c.key)?.status?.app;
          if (app === undefined) continue;
          const row = this.#row(c.key, app);
          if (c.kind === 'machine_spec') {
            if (row.spec) this.#byAddress.delete(addressKey(row.spec.private_ip));
            row.spec = c.op === 'put' ? c.value : undefined;
            if (row.spec) this.#byAddress.set(addressKey(row.spec.private_ip), c.key);
          } else {
            row.status = c.op === 'put' ? c.value : undefined;
          }
          if (!row.spec && !row.status) {
            this.#machines.delete(c.key);
            this.#appMachines.get(app)?.delete(c.key);
          }
          this.#drop(app);
          break;
        }
        default:
          continue; // events, leases, certificates: nothing DNS shows
      }
      changed = true;
    }
    if (changed) this.#generation++;
  }

  /** Every organization with its network number, sorted by number. */
  orgs(): Array<{ slug: string; network: number }> {
    return [...this.#orgNetwork].map(([slug, network]) => ({ slug, network })).sort((a, b) => a.network - b.network);
  }

  /** The org whose network number is `network`, if any. */
  orgOfNetwork(network: number): string | undefined {
    return this.#orgsByNetwork.get(network);
  }

  /** Region of the machine with private address `address`, if there is one. */
  regionOfAddress(address: string): string | undefined {
    const id = this.#byAddress.get(addressKey(address));
    return id === undefined ? undefined : this.#machines.get(id)?.spec?.region;
  }

  /** Answers `name` (lowercase, no trailing dot, inside the zone) of type `qtype` for `view`. */
  resolve(view: View, name: string, qtype: number): Resolution {
    const labels = name === zoneName ? [] : name.slice(0, -(zoneName.length + 1)).split('.');
    if (labels.length === 0) return qtype === qtypes.SOA || qtype === qtypes.ANY ? answer([soaRecord()]) : nodata;
    if (labels.length === 1 && labels[0] === '_apps') {
      const apps = this.#appsOf(view).map((a) => a.name);
      return txt(name, qtype, apps.join(','));
    }
    if (labels.length === 1 && labels[0] === '_instances') {
      const all = this.#appsOf(view).flatMap((a) => this.#instancesOf(a.name)).sort(byId);
      return txt(name, qtype, all.map((i) => `instance=${i.id},app=${i.app},ip=${i.ip},region=${i.region}`).join(';'));
    }
    const app = this.#apps.get(labels[labels.length - 1]!);
    if (!app || (view.org !== undefined && app.org_slug !== view.org)) return nxdomain;
    const all = this.#instancesOf(app.name);
    const rest = labels.slice(0, -1);
    const [first, second, third] = rest;
    switch (rest.length) {
      case 0:
        return aaaa(name, qtype, all, true);
      case 1:
        if (first === 'global') return aaaa(name, qtype, all, true);
        if (first === 'vms') return txt(name, qtype, all.map((i) => `${i.id} ${i.region}`).join(','));
        if (first === 'regions') return txt(name, qtype, [...new Set(all.map((i) => i.region))].sort().join(','));
        if (first === 'vm' || first === 'process' || first === 'of') return nodata; // empty non-terminals
        return aaaa(name, qtype, all.filter((i) => i.region === first), false);
      case 2:
        if (second === 'vm') return aaaa(name, qtype, all.filter((i) => i.id === first), false);
        if (second === 'process') return aaaa(name, qtype, all.filter((i) => i.group === first), false);
        if (first === 'nearest' && second === 'of') return nodata;
        return nxdomain;
      case 3: {
        const n = /^top([1-9]\d{0,3})$/.exec(first!);
        if (!n || second !== 'nearest' || third !== 'of') return nxdomain;
        const near = [...all.filter((i) => i.region === view.region), ...all.filter((i) => i.region !== view.region)];
        return aaaa(name, qtype, near.slice(0, Number(n[1])), false);
      }
      default:
        return nxdomain;
    }
  }

  /** Names of the apps `view` sees, sorted. */
  appNames(view: View): string[] {
    return this.#appsOf(view).map((a) => a.name);
  }

  /**
   * A token that stays the same object while the answers of `app`'s names cannot have changed (its started machines,
   * its row): engines that precompile names keep their work per app until it changes.
   */
  appToken(app: string): object {
    return this.#instancesOf(app);
  }

  /**
   * The names under `<app>.internal` that `view` can ask, with their records (what `resolve` answers for AAAA and
   * TXT), for engines that serve a precompiled zone. `top<N>.nearest.of.<app>` is listed for N = 1..`topCap`; names that
   * exist without records of their own and without listed descendants (an app with no started machine, its `vms`,
   * `vm`, ...) are returned in `empty`, for the engine to make exist some other way.
   */
  appRecords(view: View, app: string, topCap: number): PrecompiledNames {
    const all = this.#instancesOf(app);
    const names = [app, `global.${app}`, `vms.${app}`, `regions.${app}`, `vm.${app}`, `process.${app}`, `of.${app}`, `nearest.of.${app}`];
    for (const r of new Set(all.map((i) => i.region))) names.push(`${r}.${app}`);
    for (const i of all) names.push(`${i.id}.vm.${app}`);
    for (const g of new Set(all.map((i) => i.group))) names.push(`${g}.process.${app}`);
    if (all.length > 0) for (let n = 1; n <= topCap; n++) names.push(`top${n}.nearest.of.${app}`);
    return this.#precompile(view, names);
  }

  /** `_apps.internal` and `_instances.internal` for `view`, as `appRecords` gives an app's names. */
  listRecords(view: View): PrecompiledNames {
    return this.#precompile(view, ['_apps', '_instances']);
  }

  #precompile(view: View, labels: string[]): PrecompiledNames {
    const records = new Map<string, packet.Answer[]>();
    const existing: string[] = [];
    for (const label of labels) {
      const name = `${label.toLowerCase()}.${zoneName}`;
      if (records.has(name)) continue;
      const rrs = [qtypes.AAAA, qtypes.TXT].flatMap((t) => this.resolve(view, name, t).answers);
      if (rrs.length > 0) records.set(name, rrs);
      else if (this.resolve(view, name, qtypes.AAAA).rcode === rcode.noerror) existing.push(name);
    }
    const covered = new Set<string>();
    for (const name of records.keys()) {
      for (let i = name.indexOf('.'); i >= 0; i = name.indexOf('.', i + 1)) covered.add(name.slice(i + 1));
    }
    return { records, empty: existing.filter((n) => !covered.has(n)) };
  }

  #drop(app: string): void {
    const list = this.#instances.get(app);
    if (list) {
      this.#stale.set(app, list);
      this.#instances.delete(app);
    }
  }

  #putOrg(slug: string, network: number): void {
    this.#orgsByNetwork.set(network, slug);
    this.#orgNetwork.set(slug, network);
  }

  #row(id: string, app: string): MachineRow {
    let row = this.#machines.get(id);
    if (!row) {
      row = { spec: undefined, status: undefined };
      this.#machines.set(id, row);
      let set = this.#appMachines.get(app);
      if (!set) this.#appMachines.set(app, (set = new Set()));
      set.add(id);
    }
    return row;
  }

  #appsOf(view: View): App[] {
    const apps = [...this.#apps.values()].filter((a) => view.org === undefined || a.org_slug === view.org);
    return apps.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  #instancesOf(app: string): Instance[] {
    let list = this.#instances.get(app);
    if (list) return list;
    list = [];
    for (const id of this.#appMachines.get(app) ?? []) {
      const { spec, status } = this.#machines.get(id)!;
      if (!spec || !machineStarted(spec, status) || !this.#hosts.has(spec.host_id)) continue;
      list.push({ id, app, region: spec.region, ip: spec.private_ip, group: spec.config.metadata?.['fly_process_group'] ?? 'app' });
    }
    list.sort(byId);
    const old = this.#stale.get(app);
    this.#stale.delete(app);
    if (old && old.length === list.length && old.every((o, i) => sameInstance(o, list![i]!))) list = old; // nothing DNS shows changed
    this.#instances.set(app, list);
    return list;
  }
}

const sameInstance = (a: Instance, b: Instance) => a.id === b.id && a.region === b.region && a.ip === b.ip && a.group === b.group;

const nxdomain: Resolution = { rcode: rcode.nxdomain, answers: [], negative: true };
const nodata: Resolution = { rcode: rcode.noerror, answers: [], negative: true };

function answer(answers: packet.Answer[]): Resolution {
  return { rcode: rcode.noerror, answers, negative: false };
}

/** AAAA records of `instances`; with none, NODATA when the name exists regardless (`exists`), else NXDOMAIN. */
function aaaa(name: string, qtype: number, instances: Instance[], exists: boolean): Resolution {
  if (instances.length === 0) return exists ? nodata : nxdomain;
  if (qtype !== qtypes.AAAA && qtype !== qtypes.ANY) return nodata;
  return answer(instances.map((i) => ({ type: 'AAAA', name, ttl: internalTtl, data: i.ip })));
}

/** One TXT record holding `text` (split into 255-byte strings); NODATA when empty or another type is asked. */
function txt(name: string, qtype: number, text: string): Resolution {
  if (text === '' || (qtype !== qtypes.TXT && qtype !== qtypes.ANY)) return nodata;
  return answer([{ type: 'TXT', name, ttl: internalTtl, data: txtChunks(text) }]);
}

/**
 * `text` as DNS character-strings of at most 255 bytes (UTF-8) each, never cutting a character: catalog data (regions,
 * names) may hold any character. ASCII text is cut every 255 characters.
 */
export function txtChunks(text: string): string[] {
  if (!/[^\x00-\x7f]/.test(text)) {
    const chunks: string[] = [];
    for (let i = 0; i < text.length; i += 255) chunks.push(text.slice(i, i + 255));
    return chunks;
  }
  const chunks: string[] = [];
  let current = '';
  let bytes = 0;
  for (const c of text) {
    const n = Buffer.byteLength(c, 'utf8');
    if (bytes + n > 255) {
      chunks.push(current);
      current = '';
      bytes = 0;
    }
    current += c;
    bytes += n;
  }
  chunks.push(current);
  return chunks;
}

/** The zone's SOA: sent in the authority section of negative answers, its minimum is the negative-caching TTL. */
export function soaRecord(): packet.Answer {
  return {
    type: 'SOA', name: zoneName, ttl: internalTtl,
    data: { mname: `ns.${zoneName}`, rname: `hostmaster.${zoneName}`, serial: 1, refresh: 3600, retry: 600, expire: 86400, minimum: internalTtl },
  };
}
