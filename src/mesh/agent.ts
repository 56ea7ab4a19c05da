// The mesh agent: keeps the host's WireGuard peers and mesh firewall equal to the catalog, on every host or org change.
import { privateDnsAddress, type CatalogReader, type Host } from '../catalog/index.ts';
import type { Logger } from '../shared/log.ts';
import { renderWireguardConfig, type WireguardPeer } from './config.ts';
import { meshRuleset } from './firewall.ts';
import { Reconciler } from './reconcile.ts';
import { applyConfig, run } from './wireguard.ts';

export interface AgentOptions {
  catalog: CatalogReader;
  hostId: string;
  hostNumber: number;
  ifname: string;
  /** Where the applied WireGuard config is written for `wg syncconf`. */
  stateDir: string;
  privateKey: string;
  listenPort: number;
  firewall: { table: string; set: string };
  wrap: readonly string[];
  log: Logger;
}

/** The peer entry of another host, or undefined for a host without a mesh. */
function hostPeer(h: Host): WireguardPeer | undefined {
  if (!h.mesh) return undefined;
  return { publicKey: h.mesh.public_key, endpoint: h.mesh.endpoint, allowedIps: [...h.mesh.prefixes] };
}

/** Keeps the host's WireGuard peers and mesh firewall equal to the catalog, one reconciliation at a time. */
export class MeshAgent {
  readonly #o: AgentOptions;
  #applied = { wireguard: '', firewall: '' };
  readonly #reconciler: Reconciler;
  #unsubscribe: () => void = () => {};

  constructor(o: AgentOptions) {
    this.#o = o;
    this.#reconciler = new Reconciler(() => this.#apply(), (e) => o.log.error({ err: e }, 'mesh reconcile failed; retrying in 1 s'));
  }

  /** Applies the catalog once (failing loudly), then follows its changes. */
  async start(): Promise<void> {
    await this.#apply();
    this.#unsubscribe = this.#o.catalog.subscribe((batch) => {
      if (batch.changes.some((c) => c.kind === 'host' || c.kind === 'org')) void this.kick();
    });
    await this.kick(); // whatever changed in between
  }

  /** Schedules a reconciliation; resolves when the catalog as it is now has been applied (or failed to). */
  kick(): Promise<void> {
    return this.#reconciler.kick();
  }

  async #apply(): Promise<void> {
    const { catalog, hostId } = this.#o;
    const orgs = catalog.listOrgs();
    const operators = orgs.flatMap((o) => (o.wireguard_peers ?? []).filter((p) => p.gateway === hostId).map((p) => ({ ...p, network: o.network_id })));
    const peers = [
      ...catalog.listHosts().filter((h) => h.id !== hostId).flatMap((h) => hostPeer(h) ?? []),
      // An operator's device calls in (no endpoint) and may send only from its own address.
      ...operators.map((p) => ({ publicKey: p.public_key, allowedIps: [`${p.address}/128`] })),
    ];
    const wireguard = renderWireguardConfig({ privateKey: this.#o.privateKey, listenPort: this.#o.listenPort, peers });
    const firewall = meshRuleset({
      ifname: this.#o.ifname, hostNumber: this.#o.hostNumber, firewall: this.#o.firewall, dnsAddress: privateDnsAddress,
      networks: orgs.map((o) => o.network_id), operators: operators.map((p) => ({ address: p.address, network: p.network })),
    });
    if (firewall !== this.#applied.firewall) {
      await run(this.#o.wrap, 'nft', ['-f', '-'], firewall);
      this.#applied.firewall = firewall;
    }
    if (wireguard !== this.#applied.wireguard) {
      await applyConfig(this.#o, wireguard);
      this.#applied.wireguard = wireguard;
      this.#o.log.info({ peers: peers.length }, 'mesh peers applied');
    }
  }

  async close(): Promise<void> {
    this.#unsubscribe();
    await this.#reconciler.close();
  }
}
