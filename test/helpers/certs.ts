// Test certificates made with @peculiar/x509: a CA, leaves it signs (or self-signed ones) for chosen names and validity.
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';
import { randomBytes, webcrypto } from 'node:crypto';

const alg = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;
const day = 86_400_000;
type Params = Parameters<typeof x509.X509CertificateGenerator.create>[0];
type X509Crypto = NonNullable<Parameters<typeof x509.X509CertificateGenerator.create>[1]>;
const crypto = webcrypto as unknown as X509Crypto;

/** A PEM certificate (with its issuer's, when a CA signed it) and its key. */
export interface TestCert {
  /** The leaf, then the CA certificate when there is one. */
  fullchain: string;
  /** PKCS#8 PEM. */
  key: string;
  /** The leaf alone. */
  cert: string;
}

export interface TestCa {
  cert: string;
  name: string;
  key: webcrypto.CryptoKey;
}

async function keys(): Promise<webcrypto.CryptoKeyPair> {
  return webcrypto.subtle.generateKey(alg, true, ['sign', 'verify']) as Promise<webcrypto.CryptoKeyPair>;
}

/** A CA that can sign test leaves. */
export async function testCa(name = 'Tarmac Test CA'): Promise<TestCa> {
  const k = await keys();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '01' + randomBytes(8).toString('hex'), name: `CN=${name}`, notBefore: new Date(Date.now() - day), notAfter: new Date(Date.now() + 30 * day),
    signingAlgorithm: alg, keys: k as unknown as CryptoKeyPairLike,
    extensions: [new x509.BasicConstraintsExtension(true, undefined, true), new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign, true)],
  }, crypto);
  return { cert: cert.toString('pem'), name: `CN=${name}`, key: k.privateKey };
}

type CryptoKeyPairLike = Parameters<typeof x509.X509CertificateGenerator.createSelfSigned>[0]['keys'];

/** A leaf for `names` (DNS SANs), signed by `ca` or self-signed, valid from `notBefore` to `notAfter` (default: now ± a few days). */
export async function testCert(names: string[], opts: { ca?: TestCa; notBefore?: Date; notAfter?: Date } = {}): Promise<TestCert> {
  const k = await keys();
  const notBefore = opts.notBefore ?? new Date(Date.now() - day);
  const notAfter = opts.notAfter ?? new Date(Date.now() + 7 * day);
  const extensions = [
    new x509.SubjectAlternativeNameExtension(names.map((value) => ({ type: 'dns' as const, value }))),
    new x509.BasicConstraintsExtension(false),
  ];
  const serialNumber = '01' + randomBytes(8).toString('hex');
  const leaf = opts.ca === undefined
    ? await x509.X509CertificateGenerator.createSelfSigned({
      serialNumber, name: `CN=${names[0]}`, notBefore, notAfter, signingAlgorithm: alg, keys: k as unknown as CryptoKeyPairLike, extensions,
    }, crypto)
    : await x509.X509CertificateGenerator.create({
      serialNumber, subject: `CN=${names[0]}`, issuer: opts.ca.name, notBefore, notAfter, signingAlgorithm: alg,
      publicKey: k.publicKey as unknown as Params['publicKey'], signingKey: opts.ca.key as unknown as CryptoKeyPairLike['privateKey'], extensions,
    }, crypto);
  const key = x509.PemConverter.encode(await webcrypto.subtle.exportKey('pkcs8', k.privateKey), 'PRIVATE KEY');
  const cert = leaf.toString('pem');
  return { cert, key, fullchain: opts.ca === undefined ? `${cert}\n` : `${cert}\n${opts.ca.cert}\n` };
}
