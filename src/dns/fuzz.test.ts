// Fuzzing the DNS server with random and mutated packets over UDP and TCP: every reply is well-formed and it still answers afterwards.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createSocket } from 'node:dgram';
import { connect } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import packet from 'dns-packet';
import { openSqliteCatalog } from '../catalog/index.ts';
import { silentLogger } from '../shared/log.ts';
import { startDnsServer } from './index.ts';
import { Forwarder } from './forward.ts';
import { startUpstream, writeFleet } from './testing.ts';
import { parseQuery } from './wire.ts';
import { waitFor } from '../../test/helpers/wait.ts';

/** mulberry32: a seeded generator, so a failure can be replayed from the seed in its message. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const seeds = [
  packet.encode({ type: 'query', id: 1, flags: packet.RECURSION_DESIRED, questions: [{ type: 'AAAA', name: 'web.internal' }] }),
  packet.encode({ type: 'query', id: 2, questions: [{ type: 'TXT', name: '_instances.internal' }], additionals: [{ type: 'OPT', name: '.', udpPayloadSize: 4096, extendedRcode: 0, ednsVersion: 0, flags: packet.DNSSEC_OK, flag_do: true, options: [] }] }),
  packet.encode({ type: 'query', id: 3, questions: [{ type: 'AAAA', name: 'top2.nearest.of.web.internal' }] }),
  packet.encode({ type: 'query', id: 4, questions: [{ type: 'A', name: 'example.com' }] }),
];

/** A random packet, or a seed query with a few bytes flipped, cut, repeated or its counts changed. */
function fuzzPacket(r: () => number): Buffer {
  const pick = r();
  if (pick < 0.25) {
    const b = Buffer.alloc(Math.floor(r() * 600));
    for (let i = 0; i < b.length; i++) b[i] = Math.floor(r() * 256);
    if (b.length > 2 && r() < 0.5) b[2] = b[2]! & 0x7f; // mostly queries, so they get past the QR check
    return b;
  }
  let b = Buffer.from(seeds[Math.floor(r() * seeds.length)]!);
  const edits = 1 + Math.floor(r() * 4);
  for (let e = 0; e < edits; e++) {
    const kind = r();
    const at = Math.floor(r() * b.length);
    if (kind < 0.4) b[at] = Math.floor(r() * 256);
    else if (kind < 0.55) b = b.subarray(0, at);
    else if (kind < 0.7) b = Buffer.concat([b, b.subarray(at)]);
    else if (kind < 0.85 && b.length >= 12) b.writeUInt16BE(Math.floor(r() * 4), 4 + 2 * Math.floor(r() * 4));
    else b = Buffer.concat([b.subarray(0, at), Buffer.from([Math.floor(r() * 256)]), b.subarray(at)]);
  }
  return b;
}

test('random and mutated packets over UDP and TCP get well-formed replies or none, and the server keeps answering', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-dns-fuzz-'));
  const catalog = openSqliteCatalog(join(dir, 'catalog.sqlite'));
  const upstream = await startUpstream({ 'example.com': { A: '192.0.2.1' } });
  t.after(async () => {
    await upstream.close();
    await catalog.close();
    await rm(dir, { recursive: true, force: true });
  });
  const ips = await writeFleet(catalog, {
    orgs: [{ slug: 'personal', network: 1 }], hosts: [{ id: 'h1', region: 'ams', number: 1 }], apps: [{ name: 'web', org: 'personal' }],
    machines: [{ id: 'm1', app: 'web', host: 'h1', region: 'ams', hostNumber: 1, number: 1, state: 'started' }],
  });
  const dns = await startDnsServer({
    catalog, listen: [{ host: '127.0.0.1', port: 0 }], upstreams: [{ host: upstream.host, port: upstream.port }],
    trusted: ['127.0.0.0/8'], region: 'ams', log: silentLogger(), forwardTimeoutMs: 200,
  });
  t.after(() => dns.close());
  const { port } = dns.listening()[0]!;
  // The forwarder is a DNS client too: it asks the server under test as its only upstream, over UDP or TCP.
  const client = new Forwarder({ upstreams: [{ host: '127.0.0.1', port }], timeoutMs: 3000, maxInflight: 16 });
  const ask = async (query: Buffer, tcp: boolean) => {
    const answer = await client.forward(query, tcp);
    assert.ok(answer, `an answer over ${tcp ? 'TCP' : 'UDP'}`);
    return answer;
  };
  const seed = Date.now() & 0xffffffff;
  const r = rng(seed);

  // UDP: 3000 packets; collect every reply.
  const replies: Buffer[] = [];
  const sock = createSocket('udp4');
  sock.on('message', (m) => replies.push(m));
  await new Promise<void>((resolve) => sock.bind(0, '127.0.0.1', resolve));
  t.after(() => sock.close());
  let expectReplies = 0;
  const probe = packet.encode({ type: 'query', id: 7, questions: [{ type: 'AAAA', name: 'web.internal' }] });
  for (let batch = 0; batch < 60; batch++) {
    for (let i = 0; i < 50; i++) {
      const p = fuzzPacket(r);
      if (parseQuery(p).kind !== 'drop') expectReplies++;
      await new Promise<void>((resolve) => sock.send(p, port, '127.0.0.1', () => resolve()));
    }
    // The server reads its queue in order: once a probe sent after the batch is answered, the batch was read.
    await ask(probe, false);
  }
  // TCP: connections with fuzzed frames, some with lengths that lie.
  for (let c = 0; c < 50; c++) {
    const s = connect(port, '127.0.0.1');
    s.on('error', () => {});
    await new Promise<void>((resolve) => s.once('connect', () => resolve()));
    for (let i = 0; i < 10; i++) {
      const p = fuzzPacket(r);
      const len = Buffer.alloc(2);
      len.writeUInt16BE(r() < 0.9 ? p.length : Math.floor(r() * 65536));
      s.write(Buffer.concat([len, p]));
    }
    s.destroy();
  }

  // Still answering, over both transports.
  for (const tcp of [false, true]) {
    const query = packet.encode({ type: 'query', id: 77, questions: [{ type: 'AAAA', name: 'web.internal' }] });
    const answer = await ask(query, tcp);
    const decoded = packet.decode(answer);
    assert.equal(decoded.id, 77);
    assert.deepEqual(decoded.answers?.map((a) => (a as { data: unknown }).data), [ips.get('m1')], `seed ${seed}`);
  }
  // One reply for every packet that was not dropped (forwarded ones come back from the upstream or as SERVFAIL).
  await waitFor(`seed ${seed}: ${expectReplies} replies`, () => replies.length >= expectReplies, 10_000);
  assert.equal(replies.length, expectReplies, `seed ${seed}`);
  for (const m of replies) {
    const d = packet.decode(m);
    assert.equal(d.type, 'response', `seed ${seed}: every reply is a response`);
  }
});
