// The ACME account of a host: its key in the data dir (mode 0600, never logged) and an acme-client Client registered with it.
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { Agent } from 'node:https';
import { join } from 'node:path';
import { rootCertificates } from 'node:tls';
import * as acme from 'acme-client';
import { errorMessage } from '../shared/errors.ts';

/** Where and how to reach the ACME server. */
export interface AcmeAccountOptions {
  /** The ACME directory URL (Let's Encrypt's, or a test server's such as pebble's). */
  directoryUrl: string;
  /** Contact address registered with the account. */
  email?: string | undefined;
  /** PEM of a CA trusted for the directory's HTTPS besides the system roots (a private or test CA). */
  caPem?: string | undefined;
  /** Where the account key is kept, one per directory URL. */
  dir: string;
}

/**
 * Loads (or makes and saves) the account key for the directory and registers the account (an existing one is found
 * again by its key). acme-client talks through one module-wide axios instance: its HTTPS agent and timeout are set here.
 */
export async function openAcmeAccount(opts: AcmeAccountOptions): Promise<acme.Client> {
  acme.axios.defaults.timeout = 30_000;
  acme.axios.defaults.httpsAgent = new Agent({ ca: opts.caPem === undefined ? [...rootCertificates] : [...rootCertificates, opts.caPem], keepAlive: true });
  const client = new acme.Client({
    directoryUrl: opts.directoryUrl, accountKey: await accountKey(opts.dir, opts.directoryUrl), backoffAttempts: 12, backoffMin: 500, backoffMax: 10_000,
  });
  try {
    await client.createAccount({ termsOfServiceAgreed: true, ...(opts.email ? { contact: [`mailto:${opts.email}`] } : {}) });
  } catch (err) {
    // acme-client retries network errors for a while, then fails with a TypeError that names nothing useful.
    const reason = err instanceof TypeError ? 'no answer (unreachable?)' : errorMessage(err);
    throw new Error(`ACME account at ${opts.directoryUrl} could not be opened: ${reason}`, { cause: err });
  }
  return client;
}

async function accountKey(dir: string, directoryUrl: string): Promise<Buffer> {
  const file = join(dir, `account-${createHash('sha256').update(directoryUrl).digest('hex').slice(0, 16)}.pem`);
  const held = await readFile(file).catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return undefined;
    throw e;
  });
  if (held !== undefined) return held;
  const key = await acme.crypto.createPrivateEcdsaKey('P-256');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const tmp = `${file}.${process.pid}.${randomBytes(4).toString('hex')}`;
  await writeFile(tmp, key, { mode: 0o600 });
  await rename(tmp, file);
  return key;
}
