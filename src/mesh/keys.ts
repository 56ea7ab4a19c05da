// The host's WireGuard identity: a private key made on first start, kept only in the data dir (mode 0600).
import { chmod, mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { newWireguardKeyPair, wireguardPublicKey, type WireguardKeyPair } from '../shared/wireguard-keys.ts';
import { TarmacError } from '../shared/errors.ts';

/** Reads `dir/private-key`, or makes a key pair and writes it there (0600) on first use. */
export async function hostKeyPair(dir: string): Promise<WireguardKeyPair> {
  const file = join(dir, 'private-key');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const kept = (await readFile(file, 'utf8').catch(() => '')).trim();
  if (kept) {
    await chmod(file, 0o600);
    try {
      return { privateKey: kept, publicKey: wireguardPublicKey(kept) };
    } catch (e) {
      throw new TarmacError('failed_precondition', `${file} holds no WireGuard private key: remove it to make a new one`, { cause: e });
    }
  }
  const pair = newWireguardKeyPair();
  await writeFile(file, pair.privateKey + '\n', { mode: 0o600, flag: 'wx' });
  return pair;
}
