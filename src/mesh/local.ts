// A host without the mesh still joins each organization's machines on it into one network: the machines' firewall lets
// every org network reach itself between this host's machine interfaces, and the host forwards IPv6 between them.
import type { CatalogReader } from '../catalog/index.ts';
import type { Logger } from '../shared/log.ts';
import { networkPairsScript } from './firewall.ts';
import { Reconciler } from './reconcile.ts';
import { enableMachineForwarding, run } from './wireguard.ts';

export interface LocalNetworksOptions {
  catalog: Pick<CatalogReader, 'listOrgs' | 'subscribe'>;
  /** The machines' firewall (nftables inet table and its set of allowed source/destination pairs). */
  firewall: { table: string; set: string };
  log: Logger;
  /** Command prefix for the tools run (e.g. `nsenter --net=…`). */
  wrap?: readonly string[];
}

export interface RunningLocalNetworks {
  /** Applies the catalog as it is now (changes apply by themselves). */
  sync(): Promise<void>;
  close(): Promise<void>;
}

/**
 * Keeps the set of allowed pairs equal to the catalog's organizations (one `nft -f` per change of orgs) and makes
 * sure the host forwards between machine interfaces (per interface where the kernel can, else host-wide). Isolation stays as with the mesh: a machine reaches only machines of its own organization.
 */
export async function startLocalNetworks(o: LocalNetworksOptions): Promise<RunningLocalNetworks> {
  const wrap = o.wrap ?? [];
  let applied = '';
  const apply = async () => {
    const script = networkPairsScript(o.firewall, o.catalog.listOrgs().map((org) => org.network_id)).join('\n') + '\n';
    if (script === applied) return;
    await run(wrap, 'nft', ['-f', '-'], script);
    applied = script;
  };
  const reconciler = new Reconciler(apply, (e) => o.log.error({ err: e }, 'could not apply the organizations\' local networks; retrying in 1 s'));
  const forwarding = await enableMachineForwarding(wrap);
  await apply();
  o.log.info({ forwarding }, 'machines of one organization on this host reach each other');
  const unsubscribe = o.catalog.subscribe((batch) => {
    if (batch.changes.some((c) => c.kind === 'org')) void reconciler.kick();
  });
  await reconciler.kick(); // whatever changed in between
  return {
    sync: () => reconciler.kick(),
    close: async () => {
      unsubscribe();
      await reconciler.close();
    },
  };
}
