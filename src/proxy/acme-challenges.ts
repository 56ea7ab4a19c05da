// ACME challenges the proxy answers while an order is pending, read from certificate rows: HTTP-01 bodies and TLS-ALPN-01 certificates.
import { createSecureContext, type SecureContext } from 'node:tls';
import type { AcmeChallenge, Certificate } from '../catalog/index.ts';
import { errorMessage } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';

/** Path prefix of HTTP-01 validation requests (RFC 8555 §8.3). */
export const acmeHttpPrefix = '/.well-known/acme-challenge/';

/** The ALPN protocol of TLS-ALPN-01 validation (RFC 8737). */
export const acmeTlsAlpn = 'acme-tls/1';

/** Makes the self-signed TLS-ALPN-01 certificate for a host name and key authorization (PEM). */
export type AlpnCertificateMaker = (hostname: string, keyAuthorization: string) => Promise<{ cert: string; key: string }>;

/**
 * Pending challenges by host name, kept current from certificate rows. Any proxy of the fleet answers them, whichever
 * host runs the order. Lookups are Map reads; TLS-ALPN-01 certificates are made on first use and cached while pending.
 */
export class AcmeChallenges {
  readonly #byName = new Map<string, readonly AcmeChallenge[]>();
  readonly #contexts = new Map<string, Promise<SecureContext>>();
  readonly #make: AlpnCertificateMaker;
  readonly #log: Logger;

  constructor(make: AlpnCertificateMaker, log: Logger) {
    this.#make = make;
    this.#log = log;
  }

  /** Tracks a certificate row (its challenges while pending) or, for undefined, forgets the host name. */
  track(hostname: string, cert: Certificate | undefined): void {
    const challenges = cert?.acme?.status === 'pending' ? cert.acme.challenges : [];
    if (challenges.length > 0) this.#byName.set(hostname, challenges);
    else this.#byName.delete(hostname);
    for (const key of this.#contexts.keys()) {
      if (key.startsWith(`${hostname} `) && !challenges.some((c) => key === contextKey(hostname, c))) this.#contexts.delete(key);
    }
  }

  /**
   * Answers `GET /.well-known/acme-challenge/<token>` (a `url` with that prefix) with the key authorization when `host`
   * (the Host header) has that HTTP-01 challenge pending; false, with nothing sent, otherwise (the app may answer it).
   */
  answerHttp(host: string | undefined, url: string, res: { writeHead(status: number, headers: Record<string, string>): unknown; end(body: string): unknown }): boolean {
    if (host === undefined || this.#byName.size === 0) return false;
    const name = host.replace(/:\d+$/, '').replace(/\.$/, '').toLowerCase();
    const token = url.slice(acmeHttpPrefix.length);
    const found = this.#byName.get(name)?.find((c) => c.type === 'http-01' && c.token === token);
    if (found === undefined) return false;
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'cache-control': 'no-store' });
    res.end(found.key_authorization);
    return true;
  }

  /** True when an SNI name has a pending TLS-ALPN-01 challenge. */
  hasAlpn(servername: string): boolean {
    return this.#alpn(servername) !== undefined;
  }

  /** The TLS-ALPN-01 context for an SNI name (its acmeIdentifier certificate); undefined when none is pending. */
  alpnContext(servername: string): Promise<SecureContext> | undefined {
    const name = servername.toLowerCase();
    const c = this.#alpn(name);
    if (c === undefined) return undefined;
    const key = contextKey(name, c);
    let p = this.#contexts.get(key);
    if (p === undefined) {
      p = this.#make(name, c.key_authorization).then((pem) => createSecureContext(pem));
      p.catch((err: unknown) => {
        this.#contexts.delete(key);
        this.#log.error({ hostname: name, err: errorMessage(err) }, 'TLS-ALPN-01 challenge certificate could not be made');
      });
      this.#contexts.set(key, p);
    }
    return p;
  }

  #alpn(servername: string): AcmeChallenge | undefined {
    return this.#byName.get(servername.toLowerCase())?.find((c) => c.type === 'tls-alpn-01');
  }
}

function contextKey(hostname: string, c: AcmeChallenge): string {
  return `${hostname} ${c.token}`;
}
