// The rows of fleet state and the Catalog contract that every backend (embedded SQLite, etcd) implements.
import type { MachineConfig } from './machine-config.ts';

export interface Org {
  slug: string;
  name: string;
  /** 32-bit network number used in private IPv6 addresses. */
  network_id: number;
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
  updated_at: string;
}

export type Machine = { spec: MachineSpec; status: MachineStatus | undefined };

/** One committed change, delivered to subscribers after it is durable. */
export type CatalogChange =
  | { kind: 'app'; op: 'put' | 'delete'; key: string; value?: App }
  | { kind: 'machine_spec'; op: 'put' | 'delete'; key: string; value?: MachineSpec }
  | { kind: 'machine_status'; op: 'put' | 'delete'; key: string; value?: MachineStatus }
  | { kind: 'machine_event'; op: 'put'; key: string; value: MachineEvent }
  | { kind: 'lease'; op: 'put' | 'delete'; key: string; value?: Lease }
  | { kind: 'host'; op: 'put' | 'delete'; key: string; value?: Host }
  | { kind: 'org'; op: 'put' | 'delete'; key: string; value?: Org };

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
  /** Deletes the app with its machines, events and leases. */
  deleteApp(name: string): Promise<void>;
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
