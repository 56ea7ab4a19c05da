// The DNS server against dig over UDP and TCP, on both engines (Node, unbound): every `.internal` form, org scoping, negative answers, truncation, EDNS, forwarding.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { machineAddress, networkCidr, openSqliteCatalog, type Catalog } from '../catalog/index.ts';
import { createLogger, silentLogger } from '../shared/log.ts';
import { startDns, type DnsEngine, type DnsServerOptions, type RunningDns } from './index.ts';
import { waitFor } from '../../test/helpers/wait.ts';
import { dig, startUpstream, writeFleet, type DigResult, type FixtureMachine } from './testing.ts';

const haveDig = (() => {
  try {
    execFileSync('dig', ['-v'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

const haveUnbound = existsSync('/usr/sbin/unbound');

/** The TXT answers in dig's output, their strings unescaped (\\DDD bytes, \\X) and joined, decoded as UTF-8. */
function decodeTxt(raw: string): string {
  const section = /;; ANSWER SECTION:\n([\s\S]*?)(\n\n|$)/.exec(raw)?.[1] ?? '';
  const bytes: number[] = [];
  for (const line of section.split('\n')) {
    for (const m of line.matchAll(/"((?:[^"\\]|\\.)*)"/g)) {
      for (const e of m[1]!.matchAll(/\\(\d{3})|\\(.)|([^\\])/g)) {
        if (e[1] !== undefined) bytes.push(Number(e[1]));
        else bytes.push(...Buffer.from(e[2] ?? e[3]!, 'utf8'));
      }
    }
  }
  return Buffer.from(bytes).toString('utf8');
}

const sortedData = (r: DigResult) => r.answers.map((a) => a.data).sort();
/** A TXT record's text as dig prints it ("a" "b"), its strings joined. */
const unquote = (data: string) => data.replace(/" "/g, '').replace(/"/g, '');

const skipFor = (engine: DnsEngine) => !haveDig ? 'dig not installed (apt-get install bind9-dnsutils)'
  : engine === 'unbound' && !haveUnbound ? 'unbound not installed (apt-get install unbound)' : false;

for (const engine of ['node', 'unbound'] as const) describe(`dns server (${engine} engine)`, { skip: skipFor(engine) }, () => {
  let dir: string;
  let catalog: Catalog;
  let dns: RunningDns;
  let server: { host: string; port: number };
  let upstream: Awaited<ReturnType<typeof startUpstream>>;
  let ips: Map<string, string>;
  let started = 0;
  /** A server on this describe's engine, its unbound state in its own directory. */
  const start = (o: DnsServerOptions) => startDns({ ...o, engine, stateDir: join(dir, `dns-${started++}`) });

  const machines: FixtureMachine[] = [
    { id: 'a1', app: 'web', host: 'h-ams', region: 'ams', hostNumber: 1, number: 1, state: 'started' },
    { id: 'a2', app: 'web', host: 'h-ams', region: 'ams', hostNumber: 1, number: 2, state: 'started', group: 'worker' },
    { id: 'f1', app: 'web', host: 'h-fra', region: 'fra', hostNumber: 2, number: 1, state: 'started' },
    { id: 'f2', app: 'web', host: 'h-fra', region: 'fra', hostNumber: 2, number: 2, state: 'stopped' },
    { id: 'x1', app: 'api', host: 'h-fra', region: 'fra', hostNumber: 2, number: 3, state: 'started' },
    ...Array.from({ length: 60 }, (_, i): FixtureMachine => ({
      id: `b${String(i).padStart(2, '0')}`, app: 'big', host: 'h-ams', region: 'ams', hostNumber: 1, number: 100 + i, state: 'started',
    })),
  ];

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tarmac-dns-'));
    catalog = openSqliteCatalog(join(dir, 'catalog.sqlite'));
    ips = await writeFleet(catalog, {
      orgs: [{ slug: 'personal', network: 1 }, { slug: 'acme', network: 2 }],
      hosts: [{ id: 'h-ams', region: 'ams', number: 1 }, { id: 'h-fra', region: 'fra', number: 2 }],
      apps: [{ name: 'web', org: 'personal' }, { name: 'big', org: 'personal' }, { name: 'api', org: 'acme' }],
      machines,
    });
    upstream = await startUpstream({ 'example.com': { A: '192.0.2.1' } });
    dns = await start({
      catalog, listen: [{ host: '127.0.0.1', port: 0 }], upstreams: [{ host: upstream.host, port: upstream.port }],
      trusted: ['127.0.0.0/8', '::1/128'], region: 'fra', log: silentLogger(),
    });
    server = dns.listening()[0]!;
  });
  after(async () => {
    await dns?.close();
    await upstream?.close();
    await catalog?.close();
    await rm(dir, { recursive: true, force: true });
  });

  for (const transport of ['udp', 'tcp'] as const) {
    const opt = transport === 'tcp' ? ['+tcp'] : ['+notcp'];

    test(`${transport}: every name form answers from the catalog, started machines only`, async () => {
      const [a1, a2, f1, x1] = ['a1', 'a2', 'f1', 'x1'].map((id) => ips.get(id)!);
      const web = await dig(server, 'web.internal', 'AAAA', opt);
      assert.equal(web.status, 'NOERROR');
      assert.ok(web.flags.includes('aa'), 'authoritative');
      assert.deepEqual(sortedData(web), [a1, a2, f1].sort(), 'the stopped machine f2 is left out');
      assert.ok(web.answers.every((a) => a.ttl === 5 && a.type === 'AAAA'));
      assert.deepEqual(sortedData(await dig(server, 'global.web.internal', 'AAAA', opt)), [a1, a2, f1].sort());
      assert.deepEqual(sortedData(await dig(server, 'ams.web.internal', 'AAAA', opt)), [a1, a2].sort());
      assert.deepEqual(sortedData(await dig(server, 'fra.web.internal', 'AAAA', opt)), [f1]);
      assert.deepEqual(sortedData(await dig(server, 'a2.vm.web.internal', 'AAAA', opt)), [a2]);
      assert.deepEqual(sortedData(await dig(server, 'worker.process.web.internal', 'AAAA', opt)), [a2]);
      assert.deepEqual(sortedData(await dig(server, 'app.process.web.internal', 'AAAA', opt)), [a1, f1].sort());
      // Nearest to a trusted asker is this host's region (fra) first.
      assert.deepEqual((await dig(server, 'top1.nearest.of.web.internal', 'AAAA', opt)).answers.map((a) => a.data), [f1]);
      assert.deepEqual((await dig(server, 'top2.nearest.of.web.internal', 'AAAA', opt)).answers.map((a) => a.data), [f1, a1]);
      assert.equal((await dig(server, 'top9.nearest.of.web.internal', 'AAAA', opt)).answers.length, 3);
      const txt = async (name: string) => (await dig(server, name, 'TXT', opt)).answers.map((a) => a.data);
      assert.deepEqual(await txt('vms.web.internal'), ['"a1 ams,a2 ams,f1 fra"']);
      assert.deepEqual(await txt('regions.web.internal'), ['"ams,fra"']);
      assert.deepEqual(await txt('_apps.internal'), ['"api,big,web"'], 'a trusted source sees every org');
      const records = (await txt('_instances.internal')).map(unquote);
      assert.ok(records.slice(0, -1).every((r) => r.endsWith(';')), 'records after the first continue the list');
      const instances = records.join('');
      assert.ok(instances.startsWith(`instance=a1,app=web,ip=${a1},region=ams;instance=a2,app=web,ip=${a2},region=ams;`), instances);
      assert.ok(instances.includes(`instance=x1,app=api,ip=${x1},region=fra`));
      assert.equal(instances.split(';').length, 3 + 1 + 60);
      // Case is kept in the question and matched without it.
      const upper = await dig(server, 'WEB.Internal', 'AAAA', opt);
      assert.equal(upper.answers.length, 3);
      assert.match(upper.raw, /^;WEB\.Internal\.\s+IN\s+AAAA$/m, 'the question comes back as asked');
    });

    test(`${transport}: NXDOMAIN for names that do not exist, NODATA for other types, both with the SOA`, async () => {
      for (const name of ['nope.internal', 'mars.web.internal', 'zz.vm.web.internal', 'f2.vm.web.internal', 'x.y.web.internal', 'top0.nearest.of.web.internal']) {
        const r = await dig(server, name, 'AAAA', opt);
        assert.equal(r.status, 'NXDOMAIN', name);
        assert.equal(r.answers.length, 0);
        assert.equal(r.authority[0]?.type, 'SOA', `${name} carries the SOA`);
        assert.equal(r.authority[0]?.name, 'internal.');
      }
      for (const [name, type] of [['web.internal', 'A'], ['web.internal', 'TXT'], ['vms.web.internal', 'AAAA'], ['vm.web.internal', 'AAAA'], ['internal', 'AAAA']]) {
        const r = await dig(server, name!, type!, opt);
        assert.equal(r.status, 'NOERROR', `${name} ${type}`);
        assert.equal(r.answers.length, 0, `${name} ${type} has no records`);
        assert.equal(r.authority[0]?.type, 'SOA', `${name} ${type} carries the SOA`);
      }
      const soa = await dig(server, 'internal', 'SOA', opt);
      assert.equal(soa.answers[0]?.type, 'SOA');
    });
  }

  test('answers follow the catalog: a machine that starts appears, one that stops or is deleted disappears', async () => {
    const status = catalog.getMachine('f2')!.status!;
    const spec = catalog.getMachine('f2')!.spec;
    await catalog.updateMachineSpec({ ...spec, desired: 'started', version: spec.version + 1 }, spec.version);
    await catalog.putMachineStatus({ ...status, state: 'started' });
    // The Node engine answers from the zone at once; unbound gets the change a few ms later.
    await waitFor('f2 in fra.web.internal', async () => sortedData(await dig(server, 'fra.web.internal', 'AAAA')).includes(ips.get('f2')!), 5000);
    // _instances.internal (64 machines: on unbound, several TXT records that concatenate to the Node engine's one).
    await waitFor('f2 in _instances.internal', async () => (await dig(server, '_instances.internal', 'TXT', ['+tcp'])).answers.map((a) => unquote(a.data)).join('').includes('instance=f2,'), 5000);
    await catalog.putMachineStatus({ ...status, state: 'stopped' });
    await waitFor('f2 gone from fra.web.internal', async () => sortedData(await dig(server, 'fra.web.internal', 'AAAA')).join() === ips.get('f1')!, 5000);
    assert.equal((await dig(server, 'f2.vm.web.internal', 'AAAA')).status, 'NXDOMAIN');
    await catalog.createApp({ name: 'later', org_slug: 'acme', network: 'default', created_at: new Date().toISOString() });
    const later = await waitFor('later.internal', async () => { const r = await dig(server, 'later.internal', 'AAAA'); return r.status !== 'NXDOMAIN' && r; }, 5000);
    assert.equal(later.status, 'NOERROR', 'a new app with no machine exists (NODATA)');
    assert.equal(later.authority[0]?.type, 'SOA');
    assert.equal((await dig(server, 'vms.later.internal', 'TXT')).status, 'NOERROR');
    await catalog.deleteApp('later');
    await waitFor('later.internal gone', async () => (await dig(server, 'later.internal', 'AAAA')).status === 'NXDOMAIN', 5000);
  });

  test('large answers: TC over UDP within the client\'s EDNS size, complete over TCP', async () => {
    const noedns = await dig(server, 'big.internal', 'AAAA', ['+notcp', '+ignore', '+noedns']);
    assert.ok(noedns.flags.includes('tc'), 'truncated at 512 bytes');
    assert.equal(noedns.answers.length, 0);
    const edns = await dig(server, 'big.internal', 'AAAA', ['+notcp', '+ignore', '+bufsize=4096']);
    assert.ok(edns.flags.includes('tc'), 'truncated at the server\'s 1232 bytes even when the client takes more (60 AAAA need 1.7 kB even compressed)');
    assert.match(edns.edns ?? '', /udp: 1232/);
    const fits = await dig(server, 'web.internal', 'AAAA', ['+notcp', '+ignore', '+noedns']);
    assert.ok(!fits.flags.includes('tc'), 'small answers are not truncated');
    const retried = await dig(server, 'big.internal', 'AAAA'); // dig retries over TCP on TC
    assert.equal(retried.answers.length, 60);
    assert.equal((await dig(server, 'big.internal', 'AAAA', ['+tcp'])).answers.length, 60);
  });

  test('EDNS: OPT echoed with the server\'s size and the DO bit, none without it, BADVERS for version 1', async () => {
    assert.match((await dig(server, 'web.internal', 'AAAA')).edns ?? '', /^; EDNS: version: 0, flags:; udp: 1232$/);
    assert.match((await dig(server, 'web.internal', 'AAAA', ['+dnssec'])).edns ?? '', /flags: do; udp: 1232/);
    assert.equal((await dig(server, 'web.internal', 'AAAA', ['+noedns'])).edns, undefined);
    assert.match((await dig(server, 'nope.internal', 'AAAA')).edns ?? '', /udp: 1232/, 'negative answers carry OPT too');
    const v1 = await dig(server, 'web.internal', 'AAAA', ['+edns=1', '+noednsneg']);
    assert.equal(v1.status, 'BADVERS');
  });

  test('other names are forwarded to the upstream over UDP and TCP; no upstream answering is SERVFAIL', async () => {
    const before = upstream.queries;
    for (const opt of ['+notcp', '+tcp']) {
      const r = await dig(server, 'example.com', 'A', [opt]);
      assert.equal(r.status, 'NOERROR');
      assert.deepEqual(r.answers.map((a) => a.data), ['192.0.2.1']);
      assert.equal((await dig(server, 'unknown.example', 'A', [opt])).status, 'NXDOMAIN', 'the upstream\'s own NXDOMAIN is passed on');
    }
    // unbound caches what it forwarded: the TCP repeats come from its cache.
    assert.equal(upstream.queries - before, engine === 'node' ? 4 : 2);
    const dead = await start({
      catalog, listen: [{ host: '127.0.0.1', port: 0 }], upstreams: [{ host: '127.0.0.1', port: 9 }], trusted: ['127.0.0.1'],
      region: 'fra', log: silentLogger(), forwardTimeoutMs: 300,
    });
    try {
      // unbound gives up on the dead upstream within about a second (later queries may go unanswered while it
      // holds the upstream down: clients retry); the Node engine after forwardTimeoutMs.
      assert.equal((await dig(dead.listening()[0]!, 'example.com', 'A', ['+time=5'])).status, 'SERVFAIL');
      assert.equal((await dig(dead.listening()[0]!, 'web.internal', 'AAAA')).answers.length, 3, 'internal names need no upstream');
    } finally {
      await dead.close();
    }
  });

  test('a source that is neither trusted nor a machine of a known org is refused', async () => {
    const closed = await start({ catalog, listen: [{ host: '127.0.0.1', port: 0 }], upstreams: [], trusted: [], region: 'fra', log: silentLogger() });
    try {
      assert.equal((await dig(closed.listening()[0]!, 'web.internal', 'AAAA')).status, 'REFUSED');
      assert.equal((await dig(closed.listening()[0]!, 'example.com', 'A')).status, 'REFUSED', 'no open resolver');
    } finally {
      await closed.close();
    }
  });

  test('a machine sees only its own org\'s names, nearest to its own region', { skip: process.getuid?.() === 0 ? false : 'needs root to add a private address to lo' }, async () => {
    // The acme machine x1's address on lo for the length of the test: queries from it are queries from x1.
    const x1 = ips.get('x1')!;
    execFileSync('ip', ['addr', 'add', `${x1}/128`, 'dev', 'lo', 'nodad']);
    const scoped = await start({ catalog, listen: [{ host: x1, port: 0 }], upstreams: [], trusted: [], region: 'ams', log: silentLogger() });
    try {
      const at = scoped.listening()[0]!;
      const from = ['-b', x1];
      assert.deepEqual(sortedData(await dig(at, 'api.internal', 'AAAA', from)), [x1]);
      assert.equal((await dig(at, 'web.internal', 'AAAA', from)).status, 'NXDOMAIN', 'another org\'s app does not exist for it');
      assert.deepEqual((await dig(at, '_apps.internal', 'TXT', from)).answers.map((a) => a.data), ['"api"']);
      const inst = (await dig(at, '_instances.internal', 'TXT', ['-b', x1, '+tcp'])).answers.map((a) => a.data);
      assert.deepEqual(inst, [`"instance=x1,app=api,ip=${x1},region=fra"`]);
      // x1 is in fra while this server's host is in ams. The Node engine orders nearest by the asker's region; unbound's
      // views are per org, so by this host's region (on a real fleet the same: machines ask their own host's server).
      const x2 = 'fdaa:0:2:0:1:0:99:2';
      await catalog.createMachine({ ...catalog.getMachine('x1')!.spec, id: 'x2', name: 'x2', region: 'ams', host_id: 'h-ams', private_ip: x2, instance_id: 'inst-x2' }, []);
      await catalog.putMachineStatus({ ...catalog.getMachine('x1')!.status!, id: 'x2', instance_id: 'inst-x2' });
      const nearest = engine === 'node' ? [x1, x2] : [x2, x1];
      await waitFor('x2 in top2', async () => (await dig(at, 'top2.nearest.of.api.internal', 'AAAA', from)).answers.length === 2, 5000);
      assert.deepEqual((await dig(at, 'top1.nearest.of.api.internal', 'AAAA', from)).answers.map((a) => a.data), [nearest[0]]);
      assert.deepEqual((await dig(at, 'top2.nearest.of.api.internal', 'AAAA', from)).answers.map((a) => a.data), nearest);
    } finally {
      await scoped.close();
      execFileSync('ip', ['addr', 'del', `${x1}/128`, 'dev', 'lo']);
    }
  });

  test('a dns.trusted range inside an org\'s network does not show its machines other orgs\' names', { skip: process.getuid?.() === 0 ? false : 'needs root to add a private address to lo' }, async () => {
    const x1 = ips.get('x1')!; // acme's machine, network 2
    const late = machineAddress(0x7ab3, 1, 1); // an org created during the test
    for (const a of [x1, late]) execFileSync('ip', ['addr', 'add', `${a}/128`, 'dev', 'lo', 'nodad']);
    const warnings: string[] = [];
    const log = createLogger({ level: 'warn', destination: new Writable({ write(chunk, _enc, done) { warnings.push(String(chunk)); done(); } }) });
    try {
      // As wide as the org's /48, narrower, one address: each would win unbound's longest-prefix view choice (or tie).
      for (const trusted of [[networkCidr(2)], ['fdaa:0:2::/64', '127.0.0.1'], [x1]]) {
        const dns = await start({ catalog, listen: [{ host: x1, port: 0 }], upstreams: [], trusted, region: 'fra', log });
        try {
          const at = dns.listening()[0]!;
          const from = ['-b', x1];
          assert.deepEqual((await dig(at, '_apps.internal', 'TXT', from)).answers.map((a) => a.data), ['"api"'], `trusted ${trusted.join()}`);
          assert.equal((await dig(at, 'web.internal', 'AAAA', from)).status, 'NXDOMAIN', `trusted ${trusted.join()}: another org's app`);
          assert.ok(sortedData(await dig(at, 'api.internal', 'AAAA', from)).includes(x1), 'its own org\'s app');
        } finally {
          await dns.close();
        }
      }
      if (engine === 'unbound') assert.ok(warnings.some((w) => w.includes('dns.trusted entry inside')), 'the ignored entry is logged');
      // An entry that is no org's network yet stays trusted until the org appears.
      const dns = await start({ catalog, listen: [{ host: late, port: 0 }], upstreams: [], trusted: [late], region: 'fra', log });
      try {
        const at = dns.listening()[0]!;
        const from = ['-b', late];
        assert.deepEqual((await dig(at, '_apps.internal', 'TXT', from)).answers.map((a) => a.data), ['"api,big,web"'], 'trusted while no org has it');
        await catalog.putOrg({ slug: 'late', name: 'late', network_id: 0x7ab3, created_at: new Date().toISOString() });
        await waitFor('the late org to get its own view', async () => (await dig(at, 'web.internal', 'AAAA', from)).status === 'NXDOMAIN', 10_000);
        const apps = await dig(at, '_apps.internal', 'TXT', from);
        assert.equal(apps.status, 'NOERROR');
        assert.equal(apps.answers.length, 0, 'the late org has no apps');
      } finally {
        await dns.close();
      }
    } finally {
      for (const a of [x1, late]) execFileSync('ip', ['addr', 'del', `${a}/128`, 'dev', 'lo']);
    }
  });
  test('hostile catalog strings (unicode, quotes, newlines, very long) cannot stop DNS, and TXT text survives them', async () => {
    const pid = dns.pid();
    const regions = ['zürich', 'q"u\'o\\te', 'new\nline', '日本'.repeat(200), 'r'.repeat(3000)];
    const weird = 'ünï"cöde\n';
    const fleet = regions.map((region, i): FixtureMachine => ({
      id: `h${i}`, app: 'hostile', host: 'h-fra', region, hostNumber: 2, number: 200 + i, state: 'started', group: `g"'${region}`,
    }));
    await writeFleet(catalog, { orgs: [{ slug: 'acme', network: 2 }], hosts: [], apps: [{ name: 'hostile', org: 'acme' }, { name: weird, org: 'acme' }], machines: fleet });
    const txtOf = async (name: string) => decodeTxt((await dig(server, name, 'TXT', ['+tcp'])).raw);
    const expected = [...regions].sort().join(',');
    await waitFor('regions.hostile.internal', async () => (await txtOf('regions.hostile.internal')) === expected, 10_000);
    assert.ok((await txtOf('vms.hostile.internal')).startsWith('h0 zürich,h1 q"u\'o\\te,h2 new\nline,h3 日本'));
    assert.ok((await txtOf('_apps.internal')).split(',').includes(weird), 'the unicode app name in _apps');
    assert.equal((await dig(server, 'h1.vm.hostile.internal', 'AAAA')).answers.length, 1);
    // DNS still follows the catalog afterwards, from the same process.
    await catalog.createApp({ name: 'after-hostile', org_slug: 'acme', network: 'default', created_at: new Date().toISOString() });
    await waitFor('after-hostile.internal', async () => (await dig(server, 'after-hostile.internal', 'AAAA')).status === 'NOERROR', 10_000);
    assert.equal(dns.pid(), pid, 'the server never stopped');
    assert.equal((await dig(server, 'web.internal', 'AAAA')).answers.length, 3);
  });
});
