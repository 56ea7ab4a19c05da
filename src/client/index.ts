// Typed client for Tarmac's Machines API v1 (Fly's paths and JSON shapes), shared by the CLI and every test.
import type { MachineConfig } from '../catalog/machine-config.ts';

export type { MachineConfig } from '../catalog/machine-config.ts';

/** Machine states as Fly's Machines API names them. */
export type MachineStateName =
  | 'created' | 'starting' | 'started' | 'stopping' | 'stopped' | 'replacing' | 'destroying' | 'destroyed' | 'failed';

export interface AppResponse {
  id: string;
  name: string;
  organization: { name: string; slug: string };
  status: string;
  network: string;
  machine_count: number;
  /** Unix milliseconds, as in Fly's create-app response. */
  created_at: number;
}

export interface ListAppsResponse {
  total_apps: number;
  apps: AppResponse[];
}

export interface CreateAppRequest {
  /** Required unless `name` is given. */
  app_name?: string;
  /** What fly-go's flaps client sends instead of `app_name`. */
  name?: string;
  /** Accepted for Fly compatibility (fly-go sends it); has no effect. */
  app_role_id?: string;
  /** Defaults to the token's org (org tokens) or "personal" (admin). */
  org_slug?: string;
  network?: string;
  /** Accepted for Fly compatibility; has no effect. */
  enable_subdomains?: boolean;
}

export interface ImageRefResponse {
  registry: string;
  repository: string;
  tag: string;
  digest: string;
  labels: Record<string, string>;
}

export interface MachineEventResponse {
  id: string;
  type: string;
  status: string;
  source: 'user' | 'flyd';
  /** Unix milliseconds. */
  timestamp: number;
  request?: Record<string, unknown>;
}

export interface MachineResponse {
  id: string;
  name: string;
  state: MachineStateName;
  region: string;
  instance_id: string;
  private_ip: string;
  config: MachineConfig;
  image_ref: ImageRefResponse;
  events: MachineEventResponse[];
  created_at: string;
  updated_at: string;
  host_status?: 'ok' | 'unknown' | 'unreachable';
  /** The current version's instance_id, as Fly reports it. */
  version?: string;
  /** Tarmac additions. */
  cordoned?: boolean;
  desired_state?: 'started' | 'stopped' | 'destroyed';
  /** Lease nonce: on a create that asked for `lease_ttl`, and while the machine is leased (as Fly documents). */
  nonce?: string;
  /** Health check results while the machine runs checks (Fly's shape). */
  checks?: CheckStatusResponse[];
}

/** One health check's latest result in a machine's JSON. */
export interface CheckStatusResponse {
  name: string;
  status: 'passing' | 'warning' | 'critical';
  output: string;
  updated_at: string;
}

/** Body of `POST /v1/apps/{app}/machines` (and of an update). */
export interface CreateMachineRequest {
  name?: string;
  region?: string;
  config: MachineConfig;
  skip_launch?: boolean;
  /** Seconds: create the machine leased; the lease nonce comes back as the response's `nonce`. */
  lease_ttl?: number;
  // Fly create fields accepted and ignored:
  skip_service_registration?: boolean;
  skip_secrets?: boolean;
  lsvd?: boolean;
  min_secrets_version?: number;
  host_dedication_id?: string;
}

export interface UpdateMachineRequest extends CreateMachineRequest {
  /** Fly's optimistic check: the machine's current instance_id (version). */
  current_version?: string;
}

export interface LeaseData {
  nonce: string;
  /** Unix seconds. */
  expires_at: number;
  owner: string;
  description: string;
  version: string;
}

export interface LeaseResponse {
  status: 'success';
  data: LeaseData;
}

export interface OkResponse {
  ok: true;
}

/** Answer of `DELETE …/lease`, as Fly documents it. */
export interface LeaseReleaseResponse {
  status: 'success';
  data: { ok: true };
}

export interface StartResponse {
  previous_state: MachineStateName;
  migrated: boolean;
  new_host: string;
}

export interface LogEntry {
  timestamp: string;
  machine_id: string;
  stream: 'stdout' | 'stderr';
  message: string;
}

export interface ListMachinesOptions {
  region?: string;
  include_deleted?: boolean;
  /** Filter on `config.metadata` entries (`?metadata.key=value`). */
  metadata?: Record<string, string>;
}

export interface WaitOptions {
  /** Default `started`. `settled`: any state that is not on its way to another. */
  state?: 'started' | 'stopped' | 'destroyed' | 'failed' | 'created' | 'suspended' | 'settled';
  /** Wait for this version; fly-go sends the same as `version`. */
  instance_id?: string;
  /** Seconds; server default 60, max 300. */
  timeout?: number;
}

/** The lease nonce to send when the machine is leased (`fly-machine-lease-nonce`). */
export interface NonceOption {
  nonce?: string;
}

/** One host of the fleet in `GET /v1/hosts` (a Tarmac extension). Mirror fields are null until the host has reported. */
export interface HostResponse {
  id: string;
  region: string;
  roles: Array<'edge' | 'worker' | 'api'>;
  address: string;
  host_number: number;
  capacity: { cpus: number; memory_mb: number };
  /** Machines placed on the host (not destroyed). */
  machines: number;
  /** Catalog revision the host's local copy had applied when it last reported. */
  revision: number | null;
  /** Revisions of fleet state the host had not applied, counted from the newest the answering host knows. */
  lag: number | null;
  /** Milliseconds since the host's copy had last heard from the catalog, when it reported. */
  staleness_ms: number | null;
  /** When the host last reported (ISO time). */
  last_seen: string | null;
}

export interface ListHostsResponse {
  total_hosts: number;
  /** The newest revision of fleet state the answering host knows (what `lag` counts from). */
  revision: number;
  hosts: HostResponse[];
}

/** A non-2xx answer from the API (status 0: the API could not be reached). */
export class ApiError extends Error {
  override readonly name = 'ApiError';
  constructor(
    readonly status: number,
    message: string,
    readonly code?: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** A certificate as the API shows it: everything but the private key, which the API never returns. */
export interface CertificateResponse {
  hostname: string;
  app: string;
  source: 'custom' | 'self-signed' | 'acme';
  /** `pending` while an ACME order is asked for or runs, `failed` when it failed (see `error`), else `issued`. */
  status: 'pending' | 'issued' | 'failed';
  /** True when the host name gets its certificate through ACME (and renewals). */
  acme_requested: boolean;
  /** Why the last ACME order failed. */
  error?: string;
  /** Empty while ACME issues the first certificate (so are subject, validity and fingerprint). */
  issuer: string;
  subject: string;
  /** ISO times. */
  not_before: string;
  not_after: string;
  fingerprint_sha256: string;
  /** The PEM chain, leaf first (public). */
  fullchain: string;
  created_at: string;
}

/** An address of an app's own (Fly's IPAssignment, with its family). */
export interface IpAssignmentResponse {
  ip: string;
  type: 'v4' | 'v6';
  region: string;
  /** Always false: shared addresses are Fly's anycast IPv4 for HTTP, which Tarmac serves by Host on the shared ports. */
  shared: boolean;
  service_name: string;
  created_at: string;
}

/** An operator's WireGuard peer in an org's network (Tarmac's `tarmac wireguard create`). */
export interface WireguardPeerResponse {
  name: string;
  org_slug: string;
  /** The device's address in the org's network (its config's Interface Address, /128). */
  address: string;
  public_key: string;
  /** The internal DNS server the device uses (fdaa::3 on the gateway). */
  dns: string;
  /** What the device routes to the gateway: the org's network and the DNS address. */
  allowed_ips: string[];
  gateway: { id: string; public_key: string; endpoint: string };
  created_at: string;
}

export interface ListIpAssignmentsResponse {
  ips: IpAssignmentResponse[];
}

export interface ListCertificatesResponse {
  total_certificates: number;
  certificates: CertificateResponse[];
}

/** Body of `POST /v1/apps/{app}/certificates/custom`: PEM, unencrypted key. */
export interface AddCustomCertificateRequest {
  hostname: string;
  fullchain: string;
  private_key: string;
}

export interface ClientOptions {
  /** Base URL without `/v1`, e.g. http://127.0.0.1:4280 */
  baseUrl: string;
  token: string;
  fetch?: typeof fetch;
}

type Query = Record<string, string | number | boolean | undefined>;

interface RequestOptions {
  query?: Query;
  body?: unknown;
  nonce?: string | undefined;
  signal?: AbortSignal | undefined;
}

const enc = encodeURIComponent;

export class TarmacClient {
  readonly baseUrl: string;
  readonly #token: string;
  readonly #fetch: typeof fetch;

  constructor(opts: ClientOptions) {
    this.baseUrl = opts.baseUrl.replace(/\/+$/, '').replace(/\/v1$/, '');
    this.#token = opts.token;
    this.#fetch = opts.fetch ?? globalThis.fetch;
  }

  // ---- apps ----

  createApp(body: CreateAppRequest): Promise<AppResponse> {
    return this.#json('POST', '/v1/apps', { body });
  }

  listApps(org_slug?: string): Promise<ListAppsResponse> {
    return this.#json('GET', '/v1/apps', { query: { org_slug } });
  }

  getApp(app: string): Promise<AppResponse> {
    return this.#json('GET', `/v1/apps/${enc(app)}`);
  }

  async deleteApp(app: string): Promise<void> {
    await this.#json('DELETE', `/v1/apps/${enc(app)}`);
  }

  // ---- machines ----

  createMachine(app: string, body: CreateMachineRequest): Promise<MachineResponse> {
    return this.#json('POST', `/v1/apps/${enc(app)}/machines`, { body });
  }

  listMachines(app: string, opts: ListMachinesOptions = {}): Promise<MachineResponse[]> {
    const query: Query = { region: opts.region, include_deleted: opts.include_deleted };
    for (const [k, v] of Object.entries(opts.metadata ?? {})) query[`metadata.${k}`] = v;
    return this.#json('GET', `/v1/apps/${enc(app)}/machines`, { query });
  }

  getMachine(app: string, id: string): Promise<MachineResponse> {
    return this.#json('GET', this.#m(app, id));
  }

  updateMachine(app: string, id: string, body: UpdateMachineRequest, opts: NonceOption = {}): Promise<MachineResponse> {
    return this.#json('POST', this.#m(app, id), { body, nonce: opts.nonce });
  }

  deleteMachine(app: string, id: string, opts: { force?: boolean } & NonceOption = {}): Promise<OkResponse> {
    return this.#json('DELETE', this.#m(app, id), { query: { force: opts.force }, nonce: opts.nonce });
  }

  startMachine(app: string, id: string, opts: NonceOption = {}): Promise<StartResponse> {
    return this.#json('POST', `${this.#m(app, id)}/start`, { nonce: opts.nonce });
  }

  /** `timeout` is a Go duration ("10s") or seconds. */
  stopMachine(app: string, id: string, opts: { signal?: string; timeout?: string | number } & NonceOption = {}): Promise<OkResponse> {
    const body: Record<string, unknown> = {};
    if (opts.signal !== undefined) body['signal'] = opts.signal;
    if (opts.timeout !== undefined) body['timeout'] = typeof opts.timeout === 'number' ? `${opts.timeout}s` : opts.timeout;
    return this.#json('POST', `${this.#m(app, id)}/stop`, { body, nonce: opts.nonce });
  }

  restartMachine(app: string, id: string, opts: { signal?: string; timeout?: string | number } & NonceOption = {}): Promise<OkResponse> {
    const timeout = typeof opts.timeout === 'number' ? `${opts.timeout}s` : opts.timeout;
    return this.#json('POST', `${this.#m(app, id)}/restart`, { query: { signal: opts.signal, timeout }, nonce: opts.nonce });
  }

  signalMachine(app: string, id: string, signal: string, opts: NonceOption = {}): Promise<OkResponse> {
    return this.#json('POST', `${this.#m(app, id)}/signal`, { body: { signal }, nonce: opts.nonce });
  }

  /** Resolves when the machine reaches the state; throws ApiError 408 when the timeout runs out. */
  waitMachine(app: string, id: string, opts: WaitOptions = {}): Promise<OkResponse> {
    return this.#json('GET', `${this.#m(app, id)}/wait`, { query: { state: opts.state, instance_id: opts.instance_id, timeout: opts.timeout } });
  }

  listEvents(app: string, id: string): Promise<MachineEventResponse[]> {
    return this.#json('GET', `${this.#m(app, id)}/events`);
  }

  cordon(app: string, id: string, opts: NonceOption = {}): Promise<OkResponse> {
    return this.#json('POST', `${this.#m(app, id)}/cordon`, { nonce: opts.nonce });
  }

  uncordon(app: string, id: string, opts: NonceOption = {}): Promise<OkResponse> {
    return this.#json('POST', `${this.#m(app, id)}/uncordon`, { nonce: opts.nonce });
  }

  // ---- leases ----

  getLease(app: string, id: string): Promise<LeaseResponse> {
    return this.#json('GET', `${this.#m(app, id)}/lease`);
  }

  /** `ttl` in seconds. Pass the current `nonce` to refresh a lease you hold. */
  acquireLease(app: string, id: string, body: { ttl?: number; description?: string } = {}, nonce?: string): Promise<LeaseResponse> {
    return this.#json('POST', `${this.#m(app, id)}/lease`, { body, nonce });
  }

  async releaseLease(app: string, id: string, nonce: string): Promise<void> {
    await this.#json('DELETE', `${this.#m(app, id)}/lease`, { nonce });
  }

  // ---- certificates ----

  /** Uploads a certificate for one of the app's host names (replacing the app's previous one for that name). */
  addCustomCertificate(app: string, body: AddCustomCertificateRequest): Promise<CertificateResponse> {
    return this.#json('POST', `/v1/apps/${enc(app)}/certificates/custom`, { body });
  }

  /**
   * Asks for a Let's Encrypt (ACME) certificate for one of the app's host names: answered at once with `status:
   * pending` (joining an order already pending); poll `getCertificate` until `issued` or `failed`.
   */
  requestAcmeCertificate(app: string, hostname: string): Promise<CertificateResponse> {
    return this.#json('POST', `/v1/apps/${enc(app)}/certificates/acme`, { body: { hostname } });
  }

  listCertificates(app: string): Promise<ListCertificatesResponse> {
    return this.#json('GET', `/v1/apps/${enc(app)}/certificates`);
  }

  getCertificate(app: string, hostname: string): Promise<CertificateResponse> {
    return this.#json('GET', `/v1/apps/${enc(app)}/certificates/${enc(hostname)}`);
  }

  async deleteCertificate(app: string, hostname: string): Promise<void> {
    await this.#json('DELETE', `/v1/apps/${enc(app)}/certificates/${enc(hostname)}`);
  }

  // ---- IP addresses ----

  /** Allocates an address of the app's own from the fleet's pool (Fly's `ip_assignments`). */
  allocateIp(app: string, body: { type: 'v4' | 'v6'; region?: string; org_slug?: string }): Promise<IpAssignmentResponse> {
    return this.#json('POST', `/v1/apps/${enc(app)}/ip_assignments`, { body });
  }

  listIps(app: string): Promise<ListIpAssignmentsResponse> {
    return this.#json('GET', `/v1/apps/${enc(app)}/ip_assignments`);
  }

  async releaseIp(app: string, ip: string): Promise<void> {
    await this.#json('DELETE', `/v1/apps/${enc(app)}/ip_assignments/${enc(ip)}`);
  }

  /** Adds an operator's device (its public key) to an org's network through a gateway host. */
  createWireguardPeer(org: string, body: { name: string; public_key: string; gateway?: string }): Promise<WireguardPeerResponse> {
    return this.#json('POST', `/v1/orgs/${enc(org)}/wireguard_peers`, { body });
  }

  listWireguardPeers(org: string): Promise<{ peers: WireguardPeerResponse[] }> {
    return this.#json('GET', `/v1/orgs/${enc(org)}/wireguard_peers`);
  }

  async removeWireguardPeer(org: string, name: string): Promise<void> {
    await this.#json('DELETE', `/v1/orgs/${enc(org)}/wireguard_peers/${enc(name)}`);
  }

  // ---- fleet (Tarmac extensions) ----

  /** Every registered host with its catalog copy's revision, lag and staleness (admin token only). */
  listHosts(): Promise<ListHostsResponse> {
    return this.#json('GET', '/v1/hosts');
  }

  // ---- logs ----

  /** Log lines of an app's machines (NDJSON). With `follow`, keeps going until `signal` aborts. */
  async *logs(app: string, opts: { machine_id?: string; follow?: boolean; signal?: AbortSignal } = {}): AsyncIterable<LogEntry> {
    const res = await this.#request('GET', `/v1/apps/${enc(app)}/logs`, {
      query: { machine_id: opts.machine_id, follow: opts.follow },
      signal: opts.signal,
    });
    if (!res.body) return;
    const decoder = new TextDecoder();
    let buffered = '';
    try {
      for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
        buffered += decoder.decode(chunk, { stream: true });
        let nl: number;
        while ((nl = buffered.indexOf('\n')) >= 0) {
          const line = buffered.slice(0, nl).trim();
          buffered = buffered.slice(nl + 1);
          if (line) yield JSON.parse(line) as LogEntry;
        }
      }
    } catch (e) {
      if (opts.signal?.aborted) return;
      throw e;
    }
    const rest = (buffered + decoder.decode()).trim();
    if (rest) yield JSON.parse(rest) as LogEntry;
  }

  // ---- plumbing ----

  #m(app: string, id: string): string {
    return `/v1/apps/${enc(app)}/machines/${enc(id)}`;
  }

  async #json<T>(method: string, path: string, opts: RequestOptions = {}): Promise<T> {
    const res = await this.#request(method, path, opts);
    const text = await res.text();
    if (!text) return undefined as T;
    try {
      return JSON.parse(text) as T;
    } catch (e) {
      throw new ApiError(res.status, `the API answered ${method} ${path} with a body that is not JSON`, 'internal', { cause: e });
    }
  }

  async #request(method: string, path: string, opts: RequestOptions): Promise<Response> {
    const url = new URL(this.baseUrl + path);
    for (const [k, v] of Object.entries(opts.query ?? {})) if (v !== undefined) url.searchParams.set(k, String(v));
    const headers: Record<string, string> = { authorization: `Bearer ${this.#token}`, accept: 'application/json' };
    if (opts.body !== undefined) headers['content-type'] = 'application/json';
    if (opts.nonce !== undefined) headers['fly-machine-lease-nonce'] = opts.nonce;
    const init: RequestInit = { method, headers };
    if (opts.body !== undefined) init.body = JSON.stringify(opts.body);
    if (opts.signal) init.signal = opts.signal;
    let res: Response;
    try {
      res = await this.#fetch(url, init);
    } catch (e) {
      if (opts.signal?.aborted) throw e;
      const cause = e instanceof Error && e.cause instanceof Error ? e.cause.message : e instanceof Error ? e.message : String(e);
      throw new ApiError(0, `cannot reach the Tarmac API at ${this.baseUrl}: ${cause}`, 'unavailable', { cause: e });
    }
    if (res.ok) return res;
    const text = await res.text().catch(() => '');
    let message = `${method} ${path}: HTTP ${res.status}`;
    let code: string | undefined;
    try {
      const body = JSON.parse(text) as { error?: unknown; code?: unknown };
      if (typeof body.error === 'string') message = body.error;
      if (typeof body.code === 'string') code = body.code;
    } catch {
      if (text) message = `${message}: ${text.slice(0, 200)}`;
    }
    throw new ApiError(res.status, message, code);
  }
}
