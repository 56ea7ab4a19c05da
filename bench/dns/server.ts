// Tarmac's DNS server as its own process for the benchmark: argv catalog path and port; prints {"port":N} when ready.
import { openSqliteCatalog } from '../../src/catalog/index.ts';
import { startDnsServer } from '../../src/dns/index.ts';
import { silentLogger } from '../../src/shared/log.ts';

const [path, port] = process.argv.slice(2);
const catalog = openSqliteCatalog(path!);
const dns = await startDnsServer({
  catalog, listen: [{ host: '127.0.0.1', port: Number(port) }], upstreams: [], trusted: ['127.0.0.0/8'], region: 'ams', log: silentLogger(),
});
process.stdout.write(JSON.stringify({ port: dns.listening()[0]!.port }) + '\n');
process.once('SIGTERM', () => void dns.close().then(() => catalog.close()));
