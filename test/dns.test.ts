// Internal DNS end to end on one host, on both engines: a machine resolves `<app>.internal` with its own system resolver (fdaa::3), scoped to its org.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startRegistry, type TestRegistry } from './helpers/registry.ts';
import { buildAndPushImage } from './helpers/images.ts';
import { startTestHost, type TestHost } from './helpers/host.ts';
import { missingPrerequisites } from './helpers/rootfs.ts';
import { waitFor } from './helpers/wait.ts';
import { dig } from '../src/dns/testing.ts';
import { privateDnsAddress } from '../src/catalog/index.ts';
import { existsSync } from 'node:fs';

const whyNot = () => missingPrerequisites('namespaces, nftables', ['runc', 'conmon', 'nft', 'umoci', 'skopeo', 'dig']);

/** Resolves $NAME with the machine's resolver (busybox nslookup reads /etc/resolv.conf) until $EXPECT shows, then logs it. */
const resolveScript = [
  'i=0',
  'while [ $i -lt 150 ]; do out=$(nslookup -type=aaaa "$NAME" 2>&1); case "$out" in *"$EXPECT"*) break;; esac; i=$((i+1)); sleep 0.2; done',
  'echo "resolv.conf: $(cat /etc/resolv.conf)"',
  'echo "nslookup: $(echo "$out" | tr "\\n" " ")"',
  'echo "resolved done"',
  'exec sleep 600',
].join('\n');

const skipFor = (engine: 'node' | 'unbound') => whyNot() || (engine === 'unbound' && !existsSync('/usr/sbin/unbound') ? 'unbound not installed (apt-get install unbound)' : false);

for (const engine of ['unbound', 'node'] as const) describe(`internal DNS on one host (${engine} engine)`, { skip: skipFor(engine) }, () => {
  let registry: TestRegistry;
  let image: string;
  let h: TestHost;

  before(async () => {
    registry = await startRegistry();
    image = await buildAndPushImage(registry.host, 'resolver', { cmd: ['sleep', '600'] });
    h = await startTestHost({ config: { dns: { engine, listen: { host: '127.0.0.1', port: 0 } } } });
    await h.host.catalog.putOrg({ slug: 'other', name: 'Other', network_id: await h.host.catalog.allocateNetworkNumber(), created_at: new Date().toISOString() });
  });
  after(async () => {
    await h?.close();
    await registry?.stop();
  });

  async function logsOf(app: string, id: string): Promise<Record<string, string>> {
    return waitFor(`machine ${id} to log its lookup`, async () => {
      const out: Record<string, string> = {};
      for await (const l of h.client.logs(app, { machine_id: id })) {
        const m = /^(resolv\.conf|nslookup|resolved): ?(.*)$/.exec(l.message.replace(/^resolved done$/, 'resolved: done'));
        if (m) out[m[1]!] = m[2]!;
      }
      return out['resolved'] ? out : undefined;
    }, 60_000);
  }

  test('a machine resolves its app by name through fdaa::3; a machine of another org cannot see it', async (t) => {
    // Another host on this Linux machine (a parallel test) may hold [fdaa::3]:53 for a while: ours takes it over after.
    await waitFor('the DNS server to listen on fdaa::3', () => h.host.dns!.listening().some((l) => l.host === privateDnsAddress), 120_000);
    await h.client.createApp({ app_name: 'dns-web', org_slug: 'personal' });
    await h.client.createApp({ app_name: 'dns-other', org_slug: 'other' });
    const target = await h.client.createMachine('dns-web', { config: { image, metadata: { fly_process_group: 'web' } } });
    await h.client.waitMachine('dns-web', target.id, { state: 'started', timeout: 60 });

    // The operator's view over loopback sees it too.
    assert.equal(h.host.dns!.engine, engine);
    // The operator's listener by address: listeners bind concurrently, so [fdaa::3]:53 may be listed first (and a query
    // from the host to it comes from fdaa::3 itself, which is no trusted source).
    const operator = h.host.dns!.listening().find((l) => l.host === '127.0.0.1')!;
    const viaLoopback = await waitFor('the operator to see the machine', async () => {
      const r = await dig(operator, 'dns-web.internal', 'AAAA');
      return r.answers.length > 0 && r;
    });
    assert.deepEqual(viaLoopback.answers.map((a) => a.data), [target.private_ip]);

    const asker = await h.client.createMachine('dns-web', {
      config: { image, init: { cmd: ['sh', '-c', resolveScript] }, env: { NAME: 'web.process.dns-web.internal', EXPECT: target.private_ip } },
    });
    const outsider = await h.client.createMachine('dns-other', {
      config: { image, init: { cmd: ['sh', '-c', resolveScript] }, env: { NAME: 'dns-web.internal', EXPECT: 'NXDOMAIN' } },
    });
    const mine = await logsOf('dns-web', asker.id);
    assert.equal(mine['resolv.conf'], `nameserver ${privateDnsAddress}`);
    assert.ok(mine['nslookup']!.includes(target.private_ip), `the machine resolved ${target.private_ip}: ${mine['nslookup']}`);
    const theirs = await logsOf('dns-other', outsider.id);
    assert.ok(theirs['nslookup']!.includes('NXDOMAIN'), `another org's machine gets NXDOMAIN: ${theirs['nslookup']}`);
    assert.ok(!theirs['nslookup']!.includes(target.private_ip));
    t.diagnostic(`same org: ${mine['nslookup']}`);
    t.diagnostic(`other org: ${theirs['nslookup']}`);
  });
});
