// The proxy's certificates: custom ones from the catalog by host name (SNI and routing), their SecureContexts cached, and self-signed defaults per app.
import 'reflect-metadata'; // @peculiar/x509's dependency injection (tsyringe) needs it loaded first
import * as x509 from '@peculiar/x509';
import { X509Certificate, createHash, randomBytes, webcrypto } from 'node:crypto';
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createSecureContext, type SecureContext } from 'node:tls';
import type { CatalogChange, CatalogReader, Certificate } from '../catalog/index.ts';
import { errorMessage } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';
import { AcmeChallenges } from './acme-challenges.ts';

/** What the certificate index reads from the catalog at start (its changes come with the routing batches). */
export type CertificateSource = Pick<CatalogReader, 'listCertificates'>;

/** TLS versions the proxy accepts: 1.2 and 1.3 only. */
export const tlsMinVersion = 'TLSv1.2';

/** Self-signed certificates are made valid this long, and made again when less than a day is left. */
const selfSignedDays = 365;
const dayMs = 86_400_000;
const ecdsa = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;

type SelfSignedParams = Parameters<typeof x509.X509CertificateGenerator.createSelfSigned>[0];
/** node:crypto's WebCrypto as @peculiar/x509 types it (the DOM's Crypto). */
type X509Crypto = NonNullable<Parameters<typeof x509.X509CertificateGenerator.createSelfSigned>[1]>;

/** A PEM certificate and key. */
export interface PemPair {
  cert: string;
  key: string;
}

/**
 * Generates a self-signed ECDSA P-256 certificate for `names` (the first is the subject), valid from now for `days`,
 * with `extensions` besides the usual ones.
 */
export async function generateSelfSigned(names: readonly string[], days = selfSignedDays, extensions: readonly x509.Extension[] = []): Promise<PemPair> {
  const crypto = webcrypto as unknown as X509Crypto;
  const keys = await webcrypto.subtle.generateKey(ecdsa, true, ['sign', 'verify']) as webcrypto.CryptoKeyPair;
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomBytes(12).toString('hex').replace(/^[89a-f]/, '1'),
    name: `CN=${names[0]}, O=Tarmac self-signed`,
    notBefore: new Date(now - 60_000),
    notAfter: new Date(now + days * dayMs),
    signingAlgorithm: ecdsa,
    keys: keys as unknown as SelfSignedParams['keys'],
    extensions: [
      new x509.SubjectAlternativeNameExtension(names.map((value) => ({ type: 'dns' as const, value }))),
      new x509.BasicConstraintsExtension(false),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
      ...extensions,
    ],
  }, crypto);
  const key = x509.PemConverter.encode(await webcrypto.subtle.exportKey('pkcs8', keys.privateKey), 'PRIVATE KEY');
  return { cert: `${cert.toString('pem').trimEnd()}\n`, key: `${key.trimEnd()}\n` };
}

/** OID of the acmeIdentifier extension (RFC 8737 §3). */
const acmeIdentifierOid = '1.3.6.1.5.5.7.1.31';

/**
 * The TLS-ALPN-01 challenge certificate for a host name: self-signed, for that name only, with the critical
 * acmeIdentifier extension holding the SHA-256 of the key authorization (a DER OCTET STRING of 32 bytes).
 */
export function alpnChallengeCertificate(hostname: string, keyAuthorization: string): Promise<PemPair> {
  const digest = createHash('sha256').update(keyAuthorization).digest();
  const value = Buffer.concat([Buffer.from([0x04, digest.length]), digest]);
  return generateSelfSigned([hostname], 7, [new x509.Extension(acmeIdentifierOid, true, value)]);
}

export interface CertificateIndexOptions {
  source: CertificateSource;
  /** Apps are served at `<app>.<appsDomain>`: those names get self-signed certificates and are never taken by custom ones. */
  appsDomain: string;
  /** Where self-signed certificates are kept across restarts (shared by cluster workers); memory only when absent. */
  dir?: string | undefined;
  log: Logger;
}

/** How long a self-signed context is served before its file is looked at again (and renewed when near expiry). */
const selfSignedRecheckMs = 24 * 3600_000;

/**
 * Custom certificates by host name, loaded at start and kept current from catalog changes: `appOf` maps a custom host
 * name to its app for routing, `contextFor` picks the SecureContext for an SNI name (custom exact, then wildcard, then
 * a self-signed one for `<app>.<appsDomain>`). Contexts are built on first use and dropped when their row changes,
 * so a new certificate applies to the next handshake without a restart.
 */
export class CertificateIndex {
  readonly #byName = new Map<string, Certificate>();
  readonly #contexts = new Map<string, SecureContext>();
  readonly #selfSigned = new Map<string, { context: Promise<SecureContext>; until: number }>();
  readonly #suffix: string;
  readonly #dir: string | undefined;
  readonly #log: Logger;
  /** ACME challenges pending for host names (from the same rows). */
  readonly challenges: AcmeChallenges;

  constructor(opts: CertificateIndexOptions) {
    this.#suffix = `.${opts.appsDomain.toLowerCase().replace(/^\.+|\.+$/g, '')}`;
    this.#dir = opts.dir;
    this.#log = opts.log;
    this.challenges = new AcmeChallenges(alpnChallengeCertificate, opts.log);
    for (const c of opts.source.listCertificates()) {
      this.#byName.set(c.hostname, c);
      this.challenges.track(c.hostname, c);
    }
  }

  /** Applies certificate changes; true when the host names served changed (so cached Host → app answers are stale). */
  apply(changes: readonly CatalogChange[]): boolean {
    let changed = false;
    for (const c of changes) {
      if (c.kind !== 'certificate') continue;
      this.#contexts.delete(c.key);
      if (c.op === 'put' && c.value !== undefined) this.#byName.set(c.key, c.value);
      else this.#byName.delete(c.key);
      this.challenges.track(c.key, c.op === 'put' ? c.value : undefined);
      changed = true;
    }
    return changed;
  }

  /**
   * The app a certificate's host name routes to (lowercase name, no port or trailing dot): only once the row holds an
   * issued certificate (an ACME request still pending routes nothing); names under the apps domain never.
   */
  appOf(name: string): string | undefined {
    if (this.#byName.size === 0 || name.endsWith(this.#suffix)) return undefined;
    const cert = this.#custom(name);
    return cert === undefined || cert.fullchain === '' ? undefined : cert.app;
  }

  /**
   * The context for an SNI name: a custom certificate, else a self-signed one when the name is `<app>.<appsDomain>`
   * of an app that `appExists`; undefined (the listener's default) otherwise.
   */
  async contextFor(servername: string, appExists: (app: string) => boolean): Promise<SecureContext | undefined> {
    const name = servername.toLowerCase().replace(/\.$/, '');
    if (name.endsWith(this.#suffix)) {
      const app = name.slice(0, -this.#suffix.length);
      if (app === '' || !appExists(app)) {
        this.#selfSigned.delete(name);
        return undefined;
      }
      const own = this.#byName.get(name);
      if (own !== undefined && own.app === app) return this.#context(own) ?? this.#selfSignedContext(name);
      return this.#selfSignedContext(name);
    }
    const cert = this.#custom(name);
    return cert === undefined ? undefined : this.#context(cert);
  }

  /** The default certificate, for clients that send no SNI or a name nothing else covers: self-signed for the apps domain. */
  defaultPem(): Promise<PemPair> {
    const domain = this.#suffix.slice(1);
    return this.#loadOrMake(`*.${domain}`, [`*.${domain}`, domain]);
  }

  #custom(name: string): Certificate | undefined {
    const exact = this.#byName.get(name);
    if (exact !== undefined) return exact;
    const dot = name.indexOf('.');
    return dot === -1 ? undefined : this.#byName.get(`*${name.slice(dot)}`);
  }

  #context(cert: Certificate): SecureContext | undefined {
    let ctx = this.#contexts.get(cert.hostname);
    if (ctx !== undefined) return ctx;
    if (cert.fullchain === '') return undefined; // ACME is issuing its first certificate
    try {
      ctx = createSecureContext({ cert: cert.fullchain, key: cert.private_key, minVersion: tlsMinVersion });
    } catch (err) {
      // The key never reaches the log: only the name and the reason.
      this.#log.error({ hostname: cert.hostname, app: cert.app, err: errorMessage(err) }, 'certificate in the catalog cannot be used');
      return undefined;
    }
    this.#contexts.set(cert.hostname, ctx);
    return ctx;
  }

  #selfSignedContext(name: string): Promise<SecureContext> {
    const cached = this.#selfSigned.get(name);
    if (cached !== undefined && cached.until > Date.now()) return cached.context;
    // Looked at again daily: #loadOrMake replaces a certificate near its expiry, so a long-running proxy renews it.
    const p = this.#loadOrMake(name, [name]).then((pem) => createSecureContext({ ...pem, minVersion: tlsMinVersion }));
    p.catch((err: unknown) => {
      if (this.#selfSigned.get(name)?.context === p) this.#selfSigned.delete(name);
      this.#log.error({ hostname: name, err: errorMessage(err) }, 'self-signed certificate could not be made');
    });
    this.#selfSigned.set(name, { context: p, until: Date.now() + selfSignedRecheckMs });
    return p;
  }

  /** A self-signed pair from the data dir if one is there and not near expiry; otherwise a new one, saved there. */
  async #loadOrMake(name: string, names: readonly string[]): Promise<PemPair> {
    const file = this.#dir === undefined ? undefined : join(this.#dir, `${name.replace(/^\*/, '_wildcard')}.pem`);
    if (file !== undefined) {
      const text = await readFile(file, 'utf8').catch(() => undefined);
      const pair = text === undefined ? undefined : splitPem(text);
      if (pair !== undefined && validFor(pair.cert, dayMs)) return pair;
    }
    const pair = await generateSelfSigned(names);
    if (file !== undefined && this.#dir !== undefined) {
      await mkdir(this.#dir, { recursive: true, mode: 0o700 });
      const tmp = `${file}.${process.pid}.${randomBytes(4).toString('hex')}`;
      await writeFile(tmp, pair.cert + pair.key, { mode: 0o600 });
      await rename(tmp, file);
    }
    return pair;
  }
}

/** The certificate and key blocks of a PEM file holding both. */
function splitPem(text: string): PemPair | undefined {
  const cert = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----\n?/.exec(text)?.[0];
  const key = /-----BEGIN PRIVATE KEY-----[\s\S]+?-----END PRIVATE KEY-----\n?/.exec(text)?.[0];
  return cert !== undefined && key !== undefined ? { cert, key } : undefined;
}

/** True when the PEM certificate stays valid for at least `ms` more. */
function validFor(pem: string, ms: number): boolean {
  try {
    return Date.parse(new X509Certificate(pem).validTo) - Date.now() > ms;
  } catch {
    return false;
  }
}
