// Certificate rows from PEM: parse a chain and key, check they fit a host name, and describe the leaf (no secrets out).
import { X509Certificate, createPrivateKey, type KeyObject } from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';
import { TarmacError } from '../shared/errors.ts';
import type { Certificate, CertificateSource, Expect } from './types.ts';

/** A DNS host name a certificate may be for: lowercase labels, optionally a leading `*.` wildcard label. */
export const certificateHostnamePattern = /^(?:\*\.)?(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

/** Why a chain and key cannot serve a host name, by the input field at fault. */
export interface CertificateProblem {
  field: 'fullchain' | 'private_key' | 'hostname';
  message: string;
}

const pemBlock = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

/** The certificates of a PEM chain, leaf first; a problem if there is none or one does not parse. */
function parseChain(fullchain: string): X509Certificate[] | CertificateProblem {
  const blocks = fullchain.match(pemBlock) ?? [];
  if (blocks.length === 0) return { field: 'fullchain', message: 'must hold at least one PEM "BEGIN CERTIFICATE" block' };
  const out: X509Certificate[] = [];
  for (const [i, block] of blocks.entries()) {
    try {
      out.push(new X509Certificate(block));
    } catch {
      return { field: 'fullchain', message: `certificate ${i + 1} of the chain is not a valid X.509 certificate` };
    }
  }
  return out;
}

/** True when the leaf covers `hostname`; a wildcard name needs the same wildcard in the certificate. */
function covers(leaf: X509Certificate, hostname: string): boolean {
  if (hostname.startsWith('*.')) return (leaf.subjectAltName ?? '').split(/,\s*/).includes(`DNS:${hostname}`);
  return leaf.checkHost(hostname) !== undefined;
}

/**
 * Builds a certificate row from PEM input after checking it: the chain parses, the key parses and matches the leaf,
 * the leaf covers `hostname` and has not expired. Returns the problem (naming the field) otherwise. The key's text
 * never appears in a problem.
 */
export function certificateFromPem(input: {
  hostname: string; app: string; source: CertificateSource; fullchain: string; private_key: string; now?: Date;
}): Certificate | CertificateProblem {
  const chain = parseChain(input.fullchain);
  if (!Array.isArray(chain)) return chain;
  const leaf = chain[0]!;
  let key: KeyObject;
  try {
    key = createPrivateKey(input.private_key);
  } catch {
    return { field: 'private_key', message: 'must be an unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)' };
  }
  if (!leaf.checkPrivateKey(key)) return { field: 'private_key', message: 'does not match the first certificate of fullchain' };
  if (!covers(leaf, input.hostname)) {
    return { field: 'hostname', message: `is not covered by the certificate (it is for ${leaf.subjectAltName ?? leaf.subject.replace(/\n/g, ', ')})` };
  }
  const notAfter = new Date(leaf.validTo);
  const now = input.now ?? new Date();
  if (notAfter.getTime() <= now.getTime()) return { field: 'fullchain', message: `the certificate expired on ${notAfter.toISOString()}` };
  return {
    hostname: input.hostname,
    app: input.app,
    source: input.source,
    fullchain: chain.map((c) => c.toString()).join(''),
    private_key: key.export({ type: 'pkcs8', format: 'pem' }).toString(),
    issuer: leaf.issuer.replace(/\n/g, ', '),
    subject: leaf.subject.replace(/\n/g, ', '),
    not_before: new Date(leaf.validFrom).toISOString(),
    not_after: notAfter.toISOString(),
    fingerprint_sha256: leaf.fingerprint256,
    created_at: now.toISOString(),
  };
}

/** True when `x` is a problem rather than a row. */
export function isCertificateProblem(x: Certificate | CertificateProblem): x is CertificateProblem {
  return 'field' in x;
}

/** Throws conflict unless the certificate row held now is the one a compare-and-swap put expects (or there is no expectation). */
export function checkCertificateCas(hostname: string, held: Certificate | undefined, cas: Expect<Certificate> | undefined): void {
  if (cas !== undefined && !isDeepStrictEqual(held, cas.expect)) {
    throw new TarmacError('conflict', `the certificate of ${hostname} changed since it was read; read it again and retry`);
  }
}
