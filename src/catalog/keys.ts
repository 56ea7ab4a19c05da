// The catalog's key layout in etcd: one owner per key where possible, and how the mirror maps keys to rows.
//
//   <prefix>orgs/<slug>                        Org            (API)
//   <prefix>tokens/<hash>                      ApiToken       (API)
//   <prefix>apps/<name>                        App            (API; created only if absent)
//   <prefix>app-machines/<app>/<id>            ''             (API; membership index, so deleteApp finds every machine)
//   <prefix>names/<app>/<name>                 machine id     (API; live machine names, created only if absent)
//   <prefix>machines/<id>/spec                 MachineSpec    (API; desired state, CAS on mod_revision)
//   <prefix>machines/<id>/status               MachineStatus  (the worker hosting the machine; observed state)
//   <prefix>events/<machine>/<event id>        MachineEvent   (API and worker; never rewritten)
//   <prefix>leases/<machine>                   Lease          (API; CAS on mod_revision)
//   <prefix>hosts/<id>                         Host           (that host, under an etcd lease with keepalive)
//   <prefix>certificates/<hostname>            Certificate    (API; CAS on mod_revision, one app per host name)
//   <prefix>app-certificates/<app>/<hostname>  ''             (API; membership index, so deleteApp finds every certificate)
//   <prefix>ips/<ip>                           IpAssignment   (API; created only if absent, one app per address)
//   <prefix>app-ips/<app>/<ip>                 ''             (API; membership index, so deleteApp finds every address)
//   <prefix>host-status/<id>                   mirror report  (that host, same lease: applied revision, staleness)
//   <prefix>counters/network                   next number    (CAS on mod_revision)
//   <prefix>counters/machine-number/<host>     next number    (CAS on mod_revision)
//
// Every segment is URI-encoded so a name can never add a level.

const enc = encodeURIComponent;

export function catalogKeys(prefix: string) {
  return {
    prefix,
    org: (slug: string) => `${prefix}orgs/${enc(slug)}`,
    token: (hash: string) => `${prefix}tokens/${enc(hash)}`,
    app: (name: string) => `${prefix}apps/${enc(name)}`,
    appMachines: (app: string) => `${prefix}app-machines/${enc(app)}/`,
    appMachine: (app: string, id: string) => `${prefix}app-machines/${enc(app)}/${enc(id)}`,
    names: (app: string) => `${prefix}names/${enc(app)}/`,
    name: (app: string, name: string) => `${prefix}names/${enc(app)}/${enc(name)}`,
    spec: (id: string) => `${prefix}machines/${enc(id)}/spec`,
    status: (id: string) => `${prefix}machines/${enc(id)}/status`,
    events: (machine: string) => `${prefix}events/${enc(machine)}/`,
    event: (machine: string, id: string) => `${prefix}events/${enc(machine)}/${enc(id)}`,
    lease: (machine: string) => `${prefix}leases/${enc(machine)}`,
    host: (id: string) => `${prefix}hosts/${enc(id)}`,
    certificate: (hostname: string) => `${prefix}certificates/${enc(hostname)}`,
    appCertificates: (app: string) => `${prefix}app-certificates/${enc(app)}/`,
    appCertificate: (app: string, hostname: string) => `${prefix}app-certificates/${enc(app)}/${enc(hostname)}`,
    ip: (ip: string) => `${prefix}ips/${enc(ip)}`,
    appIps: (app: string) => `${prefix}app-ips/${enc(app)}/`,
    appIp: (app: string, ip: string) => `${prefix}app-ips/${enc(app)}/${enc(ip)}`,
    networkCounter: () => `${prefix}counters/network`,
    machineCounter: (host: string) => `${prefix}counters/machine-number/${enc(host)}`,
  };
}
export type CatalogKeys = ReturnType<typeof catalogKeys>;

/** What a key holds, for the mirror; undefined for index and counter keys, which it does not copy. */
export type KeyRow =
  | { table: 'org' | 'token' | 'app' | 'spec' | 'status' | 'lease' | 'host' | 'certificate' | 'ip'; id: string }
  | { table: 'event'; id: string; machine: string };

export function decodeKey(prefix: string, key: string): KeyRow | undefined {
  if (!key.startsWith(prefix)) return undefined;
  const rest = key.slice(prefix.length);
  const parts = rest.split('/');
  if (rest.includes('%')) for (let i = 0; i < parts.length; i++) parts[i] = decodeURIComponent(parts[i]!);
  const [top, a, b] = parts;
  if (a === undefined) return undefined;
  if (parts.length === 2) {
    switch (top) {
      case 'orgs': return { table: 'org', id: a };
      case 'tokens': return { table: 'token', id: a };
      case 'apps': return { table: 'app', id: a };
      case 'leases': return { table: 'lease', id: a };
      case 'hosts': return { table: 'host', id: a };
      case 'certificates': return { table: 'certificate', id: a };
      case 'ips': return { table: 'ip', id: a };
      default: return undefined;
    }
  }
  if (parts.length === 3 && b !== undefined) {
    if (top === 'machines' && b === 'spec') return { table: 'spec', id: a };
    if (top === 'machines' && b === 'status') return { table: 'status', id: a };
    if (top === 'events') return { table: 'event', id: b, machine: a };
  }
  return undefined;
}

/** The end of the range of every key starting with `prefix` (etcd's "prefix + 1"). */
export function prefixEnd(prefix: string | Buffer): Buffer {
  const b = Buffer.from(prefix);
  for (let i = b.length - 1; i >= 0; i--) {
    if (b[i]! < 0xff) {
      const end = Buffer.from(b.subarray(0, i + 1));
      end[i] = b[i]! + 1;
      return end;
    }
  }
  return Buffer.from([0]);
}
