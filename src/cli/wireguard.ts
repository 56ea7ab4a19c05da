// `tarmac wireguard create`: the key pair is made here, only the public key goes to the API, and the private key is
// printed once inside a wg-quick config file, never stored.
import type { TarmacClient, WireguardPeerResponse } from '../client/index.ts';
import { newWireguardKeyPair } from '../shared/wireguard-keys.ts';

/** A wg-quick config for the device: its address and DNS in the org's network, the gateway as its one peer. */
export function wireguardConfigFile(peer: WireguardPeerResponse, privateKey: string): string {
  return [
    `# tarmac wireguard peer "${peer.name}" of organization ${peer.org_slug}, through gateway host ${peer.gateway.id}`,
    '[Interface]',
    `PrivateKey = ${privateKey}`,
    `Address = ${peer.address}/128`,
    `DNS = ${peer.dns}`,
    '',
    '[Peer]',
    `PublicKey = ${peer.gateway.public_key}`,
    `Endpoint = ${peer.gateway.endpoint}`,
    `AllowedIPs = ${peer.allowed_ips.join(', ')}`,
    'PersistentKeepalive = 25',
    '',
  ].join('\n');
}

/** Creates the peer through the API and returns it with the config file to print. */
export async function createWireguardPeer(client: TarmacClient, org: string, name: string, gateway?: string): Promise<{ peer: WireguardPeerResponse; config: string }> {
  const keys = newWireguardKeyPair();
  const peer = await client.createWireguardPeer(org, { name, public_key: keys.publicKey, ...(gateway !== undefined ? { gateway } : {}) });
  return { peer, config: wireguardConfigFile(peer, keys.privateKey) };
}
