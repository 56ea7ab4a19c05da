// The rows of fleet state and the Catalog contract that every backend (embedded SQLite, etcd) implements.
import type { MachineConfig } from './machine-config.ts';

export interface Org {
  slug: string;
  name: string;
  /** 32-bit network number used in private IPv6 addresses. */
  network_id: number;
  /** Operators' devices joined to the org's network through a gateway host (`tarmac wireguard create`). */
  wireguard_peers?: OrgWireguardPeer[];
  created_at: string;
}

/** An operator's WireGuard device in an org's network; its private key was never stored. */
export interface OrgWireguardPeer {
  /** Unique within the org. */
  name: string;
  public_key: string;
  /** Its address in the org's network (a machine address on the gateway host). */
  address: string;
  /** Id of the host it peers with. */
  gateway: string;
  created_at: string;
}

export interface ApiToken {
  /** sha256 hex of the secret; the secret itself is never stored. */
  hash: string;
  org_slug: string;
  role: 'admin' | 'org';
  name: string;
  created_at: string;
}

export interface App {
  name: string;
  org_slug: string;
  network: string;
  created_at: string;
}

/** Machine states as Fly's Machines API names them. */
export const machineStates = [
  'created', 'starting', 'started', 'stopping', 'stopped', 'replacing', 'destroying', 'destroyed', 'failed',
] as const;
export type MachineState = (typeof machineStates)[number];

/** True when a machine runs as asked: started, on its current instance, and meant to be started (DNS answers these). */
export function machineStarted(spec: MachineSpec, status: MachineStatus | undefined): boolean {
  return status !== undefined && status.state === 'started' && spec.desired === 'started' && status.instance_id === spec.instance_id;
}

/** What the API wants a machine to be; only the API writes it. */
export interface MachineSpec {
  id: string;
  app: string;
  name: string;
  region: string;
  /** Host that runs the machine (placement). */
  host_id: string;
  config: MachineConfig;
  /** Bumped on every config update; a new version is a new instance. */
  instance_id: string;
  version: number;
  desired: 'started' | 'stopped' | 'destroyed';
  /** Incremented for each user-requested restart so the worker can see a new request. */
  restart_generation: number;
  /** Stop request parameters from `/stop` (signal name and timeout ms). */
  stop?: { signal?: string; timeout_ms?: number };
  cordoned: boolean;
  private_ip: string;
  created_at: string;
  updated_at: string;
}

export interface ImageRef {
  registry: string;
  repository: string;
  tag: string;
  digest: string;
  labels: Record<string, string>;
}

/** What the worker observes; only the worker that hosts the machine writes it. */
export interface MachineStatus {
  id: string;
  app: string;
  state: MachineState;
  /** The instance the worker last acted on. */
  instance_id: string;
  image_ref?: ImageRef;
  /** Restarts made by policy for the current instance (for `max_retries`). */
  restarts: number;
  /** Last restart_generation the worker honoured. */
  restart_generation: number;
  last_exit?: ExitEvent;
  /** Health check results of the running instance (Fly's shape); written only when one changes. */
  checks?: CheckStatus[];
  updated_at: string;
}

/** One health check's latest result, as Fly's Machines API shows it under a machine's `checks`. */
export interface CheckStatus {
  name: string;
  status: 'passing' | 'warning' | 'critical';
  output: string;
  updated_at: string;
}

export interface ExitEvent {
  exit_code: number;
  oom_killed: boolean;
  requested_stop: boolean;
  restarting: boolean;
  signal: number;
  exited_at: string;
}

export interface MachineEvent {
  id: string;
  machine_id: string;
  type: 'launch' | 'start' | 'stop' | 'exit' | 'restart' | 'update' | 'destroy' | 'pull' | 'failed' | 'cordon' | 'uncordon' | 'signal';
  status: string;
  source: 'user' | 'flyd';
  /** Unix milliseconds, as Fly reports. */
  timestamp: number;
  request?: Record<string, unknown>;
}

export interface Lease {
  machine_id: string;
  nonce: string;
  owner: string;
  description: string;
  /** Unix seconds. */
  expires_at: number;
  version: string;
}

export interface Host {
  id: string;
  region: string;
  roles: Array<'edge' | 'worker' | 'api'>;
  /** 32-bit host number used in private IPv6 addresses. */
  host_number: number;
  cpus: number;
  memory_mb: number;
  address: string;
  /** `host:port` (IPv6 in brackets) where this host's proxy takes backhaul from edges; absent when it takes none. */
  backhaul?: string;
  /** This host's place in the WireGuard mesh; absent when it runs none. */
  mesh?: HostMesh;
  updated_at: string;
}

/** What other hosts need to make a host their WireGuard peer. */
export interface HostMesh {
  /** Base64 Curve25519 public key. */
  public_key: string;
  /** `ip:port` of its WireGuard listener on the underlay. */
  endpoint: string;
  /** Prefixes it owns in the mesh (its wire prefix `fdaa:HHHH:HHHH::/48`): its peer entry's AllowedIPs. */
  prefixes: string[];
}

export type Machine = { spec: MachineSpec; status: MachineStatus | undefined };

/** Where a certificate came from: uploaded by a user, generated by the proxy, or issued through ACME. */
export type CertificateSource = 'custom' | 'self-signed' | 'acme';

/**
 * A TLS certificate for one host name of an app, chosen by SNI. `private_key` is a secret: never logged, never
 * returned by the API. A host name belongs to at most one app.
 */
export interface Certificate {
  /** Lowercase DNS name, or a wildcard `*.example.com`; the key of the row. */
  hostname: string;
  app: string;
  source: CertificateSource;
  /** PEM: the leaf certificate first, then its intermediates. */
  fullchain: string;
  /** PEM private key of the leaf certificate. */
  private_key: string;
  /** The leaf's issuer and subject, as Node prints them (for display). */
  issuer: string;
  subject: string;
  /** ISO times the leaf is valid from and until. */
  not_before: string;
  not_after: string;
  /** SHA-256 fingerprint of the leaf, colon-separated hex. */
  fingerprint_sha256: string;
  created_at: string;
  /**
   * ACME issuance of this host name, when one was asked for. While `pending` the row keeps the certificate it had (none
   * yet: empty `fullchain` and `private_key`), so renewal never interrupts serving.
   */
  acme?: CertificateAcme;
}

/** Where ACME issuance of a host name stands; every proxy answers its challenges from here. */
export interface CertificateAcme {
  /** pending: an order is asked for or running; issued: the row holds the certificate it got; failed: see `error`. */
  status: 'pending' | 'issued' | 'failed';
  /** The host running the order; absent until one takes it by compare-and-swap on the row. */
  host_id?: string;
  /** Challenges to answer while pending (any edge may be asked). */
  challenges: AcmeChallenge[];
  /** Why the last order failed, as the ACME server or the client said. */
  error?: string;
  updated_at: string;
}

/** One ACME challenge a proxy answers: HTTP-01 with the key authorization, TLS-ALPN-01 with a certificate made from it. */
export interface AcmeChallenge {
  type: 'http-01' | 'tls-alpn-01';
  token: string;
  key_authorization: string;
}

/**
 * An address of an app's own (Fly's IP assignment), from the configured pool: the proxy listens there on the ports of
 * the app's services other than the shared 80 and 443. An address belongs to at most one app.
 */
export interface IpAssignment {
  /** The address in canonical text (IPv6 compressed, lowercase); the key of the row. */
  ip: string;
  app: string;
  type: 'v4' | 'v6';
  /** Fly's region of a dedicated address; 'global' when the request named none. */
  region: string;
  created_at: string;
}

/** One committed change, delivered to subscribers after it is durable. */
export type CatalogChange =
  | { kind: 'app'; op: 'put' | 'delete'; key: string; value?: App }
  | { kind: 'machine_spec'; op: 'put' | 'delete'; key: string; value?: MachineSpec }
  | { kind: 'machine_status'; op: 'put' | 'delete'; key: string; value?: MachineStatus }
  | { kind: 'machine_event'; op: 'put'; key: string; value: MachineEvent }
  | { kind: 'lease'; op: 'put' | 'delete'; key: string; value?: Lease }
  | { kind: 'host'; op: 'put' | 'delete'; key: string; value?: Host }
  | { kind: 'org'; op: 'put' | 'delete'; key: string; value?: Org }
  | { kind: 'certificate'; op: 'put' | 'delete'; key: string; value?: Certificate }
  | { kind: 'ip'; op: 'put' | 'delete'; key: string; value?: IpAssignment };

export interface ChangeBatch {
  revision: number;
  changes: CatalogChange[];
}

export interface MachineFilter {
  app?: string;
  host_id?: string;
  region?: string;
  include_deleted?: boolean;
  metadata?: Record<string, string>;
}

/**
 * Read side of the catalog. Reads are served from the host-local copy; they never block on the network.
 */
export interface CatalogReader {
  revision(): number;
  getOrg(slug: string): Org | undefined;
  listOrgs(): Org[];
  findToken(hash: string): ApiToken | undefined;
  getApp(name: string): App | undefined;
  listApps(org_slug?: string): App[];
  getMachine(id: string): Machine | undefined;
  listMachines(filter?: MachineFilter): Machine[];
  listEvents(machine_id: string, limit?: number): MachineEvent[];
  getLease(machine_id: string): Lease | undefined;
  getHost(id: string): Host | undefined;
  listHosts(): Host[];
  /** The certificate of a host name (exact name or wildcard as stored). */
  getCertificate(hostname: string): Certificate | undefined;
  /** Certificates of one app, or of every app, ordered by host name. */
  listCertificates(app?: string): Certificate[];
  /** The assignment of an address (canonical text), if any app holds it. */
  getIpAssignment(ip: string): IpAssignment | undefined;
  /** Addresses of one app, or of every app, ordered by address text. */
  listIpAssignments(app?: string): IpAssignment[];
  /** Calls `fn` after every committed batch, in revision order. Returns an unsubscribe function. */
  subscribe(fn: (batch: ChangeBatch) => void): () => void;
}

/** Compare-and-swap expectation: `undefined` means "must not exist". */
export type Expect<T> = { expect: T | undefined };

/** Write side. Every method is one atomic transaction: it all lands or nothing does. */
export interface CatalogWriter {
  putOrg(org: Org): Promise<void>;
  putToken(token: ApiToken): Promise<void>;
  /** Fails with name_taken when the app exists. */
  createApp(app: App): Promise<void>;
  /**
   * Deletes the app with its machines, events, leases, certificates and IP assignments. With `org`, only if the app
   * (as the catalog holds it now, not a possibly stale local copy) belongs to that org, else app_not_found.
   */
  deleteApp(name: string, org?: string): Promise<void>;
  /** Creates a machine spec with its first events; fails with name_taken if the name is used in the app. */
  createMachine(spec: MachineSpec, events: MachineEvent[]): Promise<void>;
  /** Replaces a spec if its version still equals `expectVersion`; fails with conflict otherwise. */
  updateMachineSpec(spec: MachineSpec, expectVersion: number, events?: MachineEvent[]): Promise<void>;
  putMachineStatus(status: MachineStatus, events?: MachineEvent[]): Promise<void>;
  /** Removes a destroyed machine's spec, status, lease and events. */
  deleteMachine(id: string): Promise<void>;
  appendEvents(events: MachineEvent[]): Promise<void>;
  /** Puts a lease when the current one matches `expectNonce` (undefined: none or expired). */
  putLease(lease: Lease, expectNonce: string | undefined): Promise<void>;
  deleteLease(machine_id: string, nonce: string): Promise<void>;
  putHost(host: Host): Promise<void>;
  /**
   * Puts a certificate (replacing the app's own one for that host name). Fails with app_not_found when the app is
   * gone, name_taken when another app holds the host name. With `cas`, only if the row held now equals `cas.expect`
   * (undefined: there is none), else conflict: of two concurrent callers one wins (ACME uses it as its lock).
   */
  putCertificate(cert: Certificate, cas?: Expect<Certificate>): Promise<void>;
  /** Deletes a host name's certificate; not_found when there is none (or, with `app`, when another app holds it now). */
  deleteCertificate(hostname: string, app?: string): Promise<void>;
  /**
   * Assigns an address to an app if no app holds it (compare-and-swap: of two concurrent callers one wins). Fails
   * with app_not_found when the app is gone, name_taken when the address is held.
   */
  createIpAssignment(ip: IpAssignment): Promise<void>;
  /** Releases an address; not_found when no app holds it (or, with `app`, when another app holds it now). */
  deleteIpAssignment(ip: string, app?: string): Promise<void>;
  /**
   * Registers a running host: puts its row and keeps it alive. With etcd the row lives under an etcd lease of
   * `ttlSeconds` renewed in the background, so a host that dies disappears (a 'host' delete change) when the lease
   * expires; `close()` revokes it at once. The embedded backend (one host) just puts the row and keeps it.
   */
  registerHost(host: Host, ttlSeconds: number): Promise<HostRegistration>;
  /** Next free machine number on a host, for private addresses; never reused. */
  allocateMachineNumber(host_id: string): Promise<number>;
  /** Next free network number for a new org. */
  allocateNetworkNumber(): Promise<number>;
}

/** Handle a host keeps while it runs (see `registerHost`). */
export interface HostRegistration {
  /** Replaces the registered row (capacity or roles changed), keeping it under the same lease. */
  update(host: Host): Promise<void>;
  /** Stops renewing and removes the registration (graceful shutdown). */
  close(): Promise<void>;
}

export interface Catalog extends CatalogReader, CatalogWriter {
  close(): Promise<void>;
}
