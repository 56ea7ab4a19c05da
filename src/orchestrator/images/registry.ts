// HTTP client for the OCI distribution API: scheme choice, bearer/basic auth challenges, typed failures.
import { Agent, fetch, type Response } from 'undici';
import { TarmacError, errorMessage } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';

export interface Credentials { username: string; password: string }

export interface RegistryClientOptions {
  log: Logger;
  insecureRegistries?: string[];
  credentials?: (registry: string) => Credentials | undefined;
}

/** Errors thrown because the registry could not be reached at all (as opposed to answering "no"). */
const unreachable = new WeakSet<Error>();
export function isUnreachable(e: unknown): boolean {
  return e instanceof Error && unreachable.has(e);
}

const loopbackHosts = new Set(['localhost', '127.0.0.1', '[::1]']);

/** Host part of "host[:port]" (IPv6 literals keep their brackets). */
function hostOf(registry: string): string {
  if (registry.startsWith('[')) return registry.slice(0, registry.indexOf(']') + 1);
  const colon = registry.indexOf(':');
  return colon >= 0 ? registry.slice(0, colon) : registry;
}

interface Challenge { scheme: string; params: Record<string, string> }

/** Parses `Bearer realm="…",service="…",scope="…"` (first challenge only, enough for registries). */
export function parseChallenge(header: string): Challenge | undefined {
  const m = /^\s*([A-Za-z]+)\s*(.*)$/.exec(header);
  if (!m || !m[1]) return undefined;
  const params: Record<string, string> = {};
  const re = /([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?/g;
  let p: RegExpExecArray | null;
  while ((p = re.exec(m[2] ?? '')) !== null) {
    const key = p[1];
    if (key) params[key.toLowerCase()] = p[2] !== undefined ? p[2].replace(/\\(.)/g, '$1') : (p[3] ?? '');
  }
  return { scheme: m[1].toLowerCase(), params };
}

export class RegistryClient {
  private readonly log: Logger;
  private readonly insecure: Set<string>;
  private readonly credentials: ((registry: string) => Credentials | undefined) | undefined;
  /** Authorization header per "registry/repository", with its expiry. */
  private readonly auth = new Map<string, { header: string; expiresAt: number }>();
  private readonly dispatcher = new Agent({ connect: { timeout: 10_000 }, headersTimeout: 30_000, bodyTimeout: 60_000 });

  constructor(opts: RegistryClientOptions) {
    this.log = opts.log;
    this.insecure = new Set(opts.insecureRegistries ?? []);
    this.credentials = opts.credentials;
  }

  /** Plain HTTP for loopback registries and configured insecure ones; HTTPS for everything else. */
  scheme(registry: string): 'http' | 'https' {
    const host = hostOf(registry);
    return loopbackHosts.has(host) || this.insecure.has(registry) || this.insecure.has(host) ? 'http' : 'https';
  }

  /**
   * Sends a request to `/v2/<repository>/<path>`, answering one auth challenge if the registry asks.
   * Network failures throw image_pull_failed marked unreachable; HTTP statuses are returned as they are.
   */
  async request(registry: string, repository: string, path: string, init: { method?: 'GET' | 'HEAD'; accept?: string; signal?: AbortSignal | undefined }): Promise<Response> {
    const url = `${this.scheme(registry)}://${registry}/v2/${repository}/${path}`;
    const key = `${registry}/${repository}`;
    let res = await this.send(url, registry, init, this.cachedAuth(key));
    if (res.status === 401) {
      const challenge = parseChallenge(res.headers.get('www-authenticate') ?? '');
      await res.body?.cancel().catch(() => {});
      const header = challenge ? await this.authorize(registry, repository, challenge, init.signal) : undefined;
      if (header === undefined) {
        throw new TarmacError('image_pull_failed', `registry ${registry} refused access to ${repository}: it asks for credentials${this.credentials?.(registry) ? ' and rejected the ones configured' : ' and none are configured'}`);
      }
      res = await this.send(url, registry, init, header);
      if (res.status === 401 || res.status === 403) {
        await res.body?.cancel().catch(() => {});
        this.auth.delete(key);
        throw new TarmacError('image_pull_failed', `registry ${registry} refused access to ${repository} (HTTP ${res.status}): check that the image exists and the credentials can pull it`);
      }
    }
    return res;
  }

  private cachedAuth(key: string): string | undefined {
    const a = this.auth.get(key);
    if (a && a.expiresAt > Date.now()) return a.header;
    if (a) this.auth.delete(key);
    return undefined;
  }

  private async send(url: string, registry: string, init: { method?: 'GET' | 'HEAD'; accept?: string; signal?: AbortSignal | undefined }, authorization: string | undefined): Promise<Response> {
    const headers: Record<string, string> = { 'user-agent': 'tarmac' };
    if (init.accept) headers['accept'] = init.accept;
    if (authorization) headers['authorization'] = authorization;
    try {
      return await fetch(url, { method: init.method ?? 'GET', headers, redirect: 'follow', dispatcher: this.dispatcher, ...(init.signal ? { signal: init.signal } : {}) });
    } catch (e) {
      if (init.signal?.aborted) throw init.signal.reason ?? e;
      throw this.unreachableError(registry, url, e);
    }
  }

  private unreachableError(registry: string, url: string, e: unknown): TarmacError {
    const cause = (e as { cause?: unknown }).cause;
    const detail = cause instanceof Error ? ((cause as { code?: string }).code ?? cause.message) : errorMessage(e);
    const err = new TarmacError('image_pull_failed', `could not reach registry ${registry} at ${new URL(url).origin} (${detail}): check the registry address and that it is running`, { cause: e });
    unreachable.add(err);
    return err;
  }

  /** Answers a challenge: a bearer token from the realm (anonymous or with credentials), or basic auth. */
  private async authorize(registry: string, repository: string, challenge: Challenge, signal: AbortSignal | undefined): Promise<string | undefined> {
    const creds = this.credentials?.(registry);
    const basic = creds ? `Basic ${Buffer.from(`${creds.username}:${creds.password}`).toString('base64')}` : undefined;
    const key = `${registry}/${repository}`;
    if (challenge.scheme === 'basic') {
      if (basic) this.auth.set(key, { header: basic, expiresAt: Date.now() + 3600_000 });
      return basic;
    }
    if (challenge.scheme !== 'bearer' || !challenge.params['realm']) return undefined;
    let realm: URL;
    try {
      realm = new URL(challenge.params['realm']);
    } catch (e) {
      throw new TarmacError('image_pull_failed', `registry ${registry} sent an invalid token realm "${challenge.params['realm']}"`, { cause: e });
    }
    if (challenge.params['service']) realm.searchParams.set('service', challenge.params['service']);
    realm.searchParams.set('scope', `repository:${repository}:pull`);
    const headers: Record<string, string> = { 'user-agent': 'tarmac', accept: 'application/json' };
    if (basic) headers['authorization'] = basic;
    let res: Response;
    try {
      res = await fetch(realm, { headers, dispatcher: this.dispatcher, ...(signal ? { signal } : {}) });
    } catch (e) {
      if (signal?.aborted) throw signal.reason ?? e;
      throw this.unreachableError(registry, realm.toString(), e);
    }
    if (!res.ok) {
      await res.body?.cancel().catch(() => {});
      throw new TarmacError('image_pull_failed', `the token service of registry ${registry} (${realm.origin}) refused a pull token for ${repository} (HTTP ${res.status})${creds ? ': check the credentials' : ''}`);
    }
    const body = (await res.json().catch(() => ({}))) as { token?: unknown; access_token?: unknown; expires_in?: unknown };
    const token = typeof body.token === 'string' ? body.token : typeof body.access_token === 'string' ? body.access_token : undefined;
    if (!token) throw new TarmacError('image_pull_failed', `the token service of registry ${registry} answered without a token`);
    const ttl = typeof body.expires_in === 'number' && body.expires_in > 0 ? body.expires_in : 60;
    const header = `Bearer ${token}`;
    // Renew a little early so a long pull does not send a token that expires in flight.
    this.auth.set(key, { header, expiresAt: Date.now() + Math.max(ttl - 10, 5) * 1000 });
    this.log.debug({ registry, repository }, 'registry token obtained');
    return header;
  }

  async close(): Promise<void> {
    await this.dispatcher.close();
  }
}
