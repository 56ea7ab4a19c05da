// The WireGuard peers API: a peer gets an address in its org's network on a gateway worker in the mesh; bad input
// names its field; another org's token sees nothing.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { newWireguardKeyPair } from '../shared/wireguard-keys.ts';
import { twoOrgApi, rejects } from './testing.ts';

test('wireguard peers: created on a mesh worker, in the org\'s network, listed, removed; checked input; org-scoped', async (t) => {
  const { catalog, admin, acme } = await twoOrgApi(t);
  const now = new Date().toISOString();
  const { publicKey } = newWireguardKeyPair();
  await rejects(admin.createWireguardPeer('personal', { name: 'laptop', public_key: publicKey }), 412, /no worker host runs the mesh/);
  const mesh = { public_key: newWireguardKeyPair().publicKey, endpoint: '10.0.0.7:51820', prefixes: ['fdaa:8000:7::/48'] };
  await catalog.putHost({ id: 'edge-1', region: 'local', roles: ['edge'], host_number: 0x8000_0001, cpus: 1, memory_mb: 512, address: '10.0.0.6', mesh, updated_at: now });
  await catalog.putHost({ id: 'w-1', region: 'local', roles: ['worker'], host_number: 0x8000_0007, cpus: 1, memory_mb: 512, address: '10.0.0.7', mesh, updated_at: now });

  await rejects(admin.createWireguardPeer('personal', { name: 'Laptop!', public_key: 'nope' }), 400, /name[\s\S]*public_key/);
  await rejects(admin.createWireguardPeer('personal', { name: 'laptop', public_key: publicKey, gateway: 'edge-1' }), 400, /gateway: "edge-1" is not a worker host in the mesh/);
  const peer = await admin.createWireguardPeer('personal', { name: 'laptop', public_key: publicKey });
  assert.equal(peer.gateway.id, 'w-1');
  assert.equal(peer.gateway.endpoint, '10.0.0.7:51820');
  assert.equal(peer.gateway.public_key, mesh.public_key);
  assert.match(peer.address, /^fdaa:0:1:8000:7:0:[0-9a-f]+:2$/, 'an address of org personal (network 1) on the gateway');
  assert.deepEqual(peer.allowed_ips, ['fdaa:0:1::/48', 'fdaa::3/128']);
  assert.equal(peer.dns, 'fdaa::3');
  assert.deepEqual(catalog.getOrg('personal')?.wireguard_peers?.map((p) => [p.name, p.public_key, p.gateway]), [['laptop', publicKey, 'w-1']]);
  await rejects(admin.createWireguardPeer('personal', { name: 'laptop', public_key: publicKey }), 409, /already has a WireGuard peer "laptop"/);

  await rejects(acme.listWireguardPeers('personal'), 404, /organization "personal" not found/);
  await rejects(acme.createWireguardPeer('personal', { name: 'x', public_key: publicKey }), 404, /not found/);
  assert.deepEqual((await acme.listWireguardPeers('acme')).peers, []);
  assert.deepEqual((await admin.listWireguardPeers('personal')).peers.map((p) => p.address), [peer.address]);
  await admin.removeWireguardPeer('personal', 'laptop');
  assert.deepEqual(catalog.getOrg('personal')?.wireguard_peers, []);
  await rejects(admin.removeWireguardPeer('personal', 'laptop'), 404, /no WireGuard peer "laptop"/);
});
