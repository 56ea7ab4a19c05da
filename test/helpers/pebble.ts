// Starts Debian's pebble (Let's Encrypt's test ACME server) on loopback with a tiny DNS responder, and stops it.
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';
import { spawn } from 'node:child_process';
import { randomBytes, webcrypto } from 'node:crypto';
import { createSocket } from 'node:dgram';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { get } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import packet from 'dns-packet';
import { freePort } from './registry.ts';
import { waitFor } from './wait.ts';

export interface Pebble {
  /** https://127.0.0.1:PORT/dir */
  directoryUrl: string;
  /** PEM file of the certificate of pebble's own HTTPS listener (trust it to reach the directory). */
  caFile: string;
  /** The root that issued pebble's certificates (from its management interface). */
  issuingRoot(): Promise<string>;
  close(): Promise<void>;
}

const alg = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;
type X509Crypto = NonNullable<Parameters<typeof x509.X509CertificateGenerator.createSelfSigned>[1]>;
type Keys = Parameters<typeof x509.X509CertificateGenerator.createSelfSigned>[0]['keys'];

/** A self-signed certificate for 127.0.0.1 (pebble's listeners), its own trust anchor. */
async function loopbackCert(): Promise<{ cert: string; key: string }> {
  const keys = await webcrypto.subtle.generateKey(alg, true, ['sign', 'verify']) as webcrypto.CryptoKeyPair;
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '01' + randomBytes(8).toString('hex'), name: 'CN=pebble test listener', notBefore: new Date(Date.now() - 60_000),
    notAfter: new Date(Date.now() + 86_400_000), signingAlgorithm: alg, keys: keys as unknown as Keys,
    extensions: [
      new x509.SubjectAlternativeNameExtension([{ type: 'ip', value: '127.0.0.1' }, { type: 'dns', value: 'localhost' }]),
      new x509.BasicConstraintsExtension(true, undefined, true),
    ],
  }, webcrypto as unknown as X509Crypto);
  const key = x509.PemConverter.encode(await webcrypto.subtle.exportKey('pkcs8', keys.privateKey), 'PRIVATE KEY');
  return { cert: cert.toString('pem'), key };
}

/** GET over HTTPS trusting `ca`: the body, or a rejection naming the status. */
function fetchText(url: string, ca: string): Promise<string> {
  return new Promise((resolve, reject) => {
    get(url, { ca }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => { body += c; });
      res.on('end', () => (res.statusCode === 200 ? resolve(body) : reject(new Error(`GET ${url}: ${res.statusCode}`))));
    }).on('error', reject);
  });
}

/**
 * Starts pebble validating HTTP-01 on `httpPort` and TLS-ALPN-01 on `tlsPort` of whatever address a name resolves
 * to, resolving names through a DNS responder that answers A records from `names` (nothing else). Validation runs
 * at once (PEBBLE_VA_NOSLEEP) and authorizations are never reused, so every order proves its challenge.
 */
export async function startPebble(opts: { httpPort: number; tlsPort: number; names: Record<string, string> }): Promise<Pebble> {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-pebble-'));
  const dns = createSocket('udp4');
  dns.on('message', (msg, rinfo) => {
    let query: packet.Packet;
    try {
      query = packet.decode(msg);
    } catch {
      return;
    }
    const q = query.questions?.[0];
    const ip = q === undefined ? undefined : opts.names[q.name.toLowerCase()];
    const answers = q !== undefined && ip !== undefined && q.type === 'A' ? [{ type: 'A' as const, name: q.name, ttl: 1, data: ip }] : [];
    const reply = packet.encode({
      id: query.id, type: 'response', flags: packet.RECURSION_DESIRED | packet.RECURSION_AVAILABLE | (ip === undefined ? 3 : 0),
      questions: query.questions ?? [], answers,
    });
    dns.send(reply, rinfo.port, rinfo.address);
  });
  await new Promise<void>((r) => dns.bind(0, '127.0.0.1', r));
  const dnsPort = dns.address().port;

  const listener = await loopbackCert();
  const caFile = join(dir, 'listener.pem');
  await writeFile(caFile, listener.cert);
  await writeFile(join(dir, 'listener-key.pem'), listener.key, { mode: 0o600 });
  const [acmePort, mgmtPort] = [await freePort(), await freePort()];
  await writeFile(join(dir, 'pebble.json'), JSON.stringify({
    pebble: {
      listenAddress: `127.0.0.1:${acmePort}`, managementListenAddress: `127.0.0.1:${mgmtPort}`, certificate: caFile,
      privateKey: join(dir, 'listener-key.pem'), httpPort: opts.httpPort, tlsPort: opts.tlsPort, ocspResponderURL: '',
      externalAccountBindingRequired: false,
    },
  }));
  const child = spawn('pebble', ['-config', join(dir, 'pebble.json'), '-dnsserver', `127.0.0.1:${dnsPort}`, '-strict', 'false'], {
    env: { ...process.env, PEBBLE_VA_NOSLEEP: '1', PEBBLE_AUTHZREUSE: '0', PEBBLE_WFE_NONCEREJECT: '0' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout.on('data', (c: Buffer) => { output += c.toString(); });
  child.stderr.on('data', (c: Buffer) => { output += c.toString(); });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const close = async () => {
    if (child.exitCode === null) child.kill('SIGTERM');
    await exited;
    await new Promise<void>((r) => dns.close(() => r()));
    await rm(dir, { recursive: true, force: true });
  };
  const directoryUrl = `https://127.0.0.1:${acmePort}/dir`;
  try {
    await waitFor(`pebble's directory (${output.slice(-200)})`, async () => {
      if (child.exitCode !== null) throw new Error(`pebble exited: ${output}`);
      return (await fetchText(directoryUrl, listener.cert)).includes('newOrder');
    });
  } catch (e) {
    await close();
    throw e;
  }
  return {
    directoryUrl,
    caFile,
    issuingRoot: () => fetchText(`https://127.0.0.1:${mgmtPort}/roots/0`, listener.cert),
    close,
  };
}
