// Tarmac's DNS server as its own process for the benchmark: argv catalog path, port, engine (unbound|node), state dir; prints {"port":N,"pid":P} when ready (P answers the queries: unbound's pid, or this process).
import { openSqliteCatalog } from '../../src/catalog/index.ts';
import { startDns, type DnsEngine } from '../../src/dns/index.ts';
import { silentLogger } from '../../src/shared/log.ts';

const [path, port, engine = 'node', stateDir = '.'] = process.argv.slice(2);
const catalog = openSqliteCatalog(path!);
const dns = await startDns({
  engine: engine as DnsEngine, stateDir,
  catalog, listen: [{ host: '127.0.0.1', port: Number(port) }], upstreams: [], trusted: ['127.0.0.0/8'], region: 'ams', log: silentLogger(),
});
process.stdout.write(JSON.stringify({ port: dns.listening()[0]!.port, pid: dns.pid() }) + '\n');
process.once('SIGTERM', () => void dns.close().then(() => catalog.close()));
