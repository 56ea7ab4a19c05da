// Renders the whole WireGuard configuration of a host (the `wg syncconf` format) from its key and its peers.

/** One peer of the host's interface: another host, or an operator's device on a gateway. */
export interface WireguardPeer {
  publicKey: string;
  /** `ip:port` of the peer's underlay (absent for an operator's device: it calls in). */
  endpoint?: string;
  allowedIps: string[];
  persistentKeepalive?: number;
}

export interface WireguardConfig {
  privateKey: string;
  listenPort: number;
  peers: readonly WireguardPeer[];
}

/** The configuration text; peers sorted by public key so that equal configurations render equal text. */
export function renderWireguardConfig(c: WireguardConfig): string {
  const lines = ['[Interface]', `PrivateKey = ${c.privateKey}`, `ListenPort = ${c.listenPort}`];
  for (const p of [...c.peers].sort((a, b) => (a.publicKey < b.publicKey ? -1 : a.publicKey > b.publicKey ? 1 : 0))) {
    lines.push('', '[Peer]', `PublicKey = ${p.publicKey}`);
    if (p.endpoint) lines.push(`Endpoint = ${p.endpoint}`);
    lines.push(`AllowedIPs = ${p.allowedIps.join(', ')}`);
    if (p.persistentKeepalive) lines.push(`PersistentKeepalive = ${p.persistentKeepalive}`);
  }
  return lines.join('\n') + '\n';
}
