// `tarmac host`: runs a host in the foreground until Ctrl-C (SIGINT) or SIGTERM, then stops cleanly.
import { parseArgs } from 'node:util';
import { join } from 'node:path';
import { createLogger } from '../shared/log.ts';
import { errorMessage, isTarmacError } from '../shared/errors.ts';
import { parseHostConfig, parseListen, readConfigFile, type HostConfigInput } from './config.ts';
import { startHost } from './host.ts';

export const hostUsage = `Usage: tarmac host [options]

Runs a Tarmac host in the foreground: Machines API, proxy and orchestrator, with the embedded catalog.

Options:
  --config FILE          TOML config (see config.example.toml)
  --data-dir DIR         data directory (default $TARMAC_DATA_DIR or ./.tarmac)
  --api-listen H:P       Machines API address (default 127.0.0.1:4280)
  --proxy-listen H:P     proxy HTTP address (default 0.0.0.0:8080)
  --proxy-https-listen H:P
                         proxy HTTPS address (default: port 8443 on the HTTP host)
  --metrics-listen H:P   Prometheus /metrics address (default 127.0.0.1:9480)
  --dns-listen H:P       internal DNS for the operator's tools (default 127.0.0.1:5353)
  --dns-engine E         unbound or node (default unbound where /usr/sbin/unbound exists)
  --apps-domain D        apps answer at <app>.D (default localhost)
  --proxy-workers N      proxy processes sharing the port (default 1)
  --proxy-engine E       haproxy (HAProxy in front of the Node proxy) or node (default haproxy where
                         /usr/sbin/haproxy exists and --proxy-workers is 1)
  --proxy-backhaul-listen H:P
                         take requests other hosts' edges forward to this host's machines
                         (a private address: the forwarding headers on it are trusted)
  --role R[,R…]          edge, worker and/or api (default all three)
  --mesh-endpoint IP:PORT
                         join the WireGuard mesh (docs/mesh.md); other hosts reach this host's UDP port there
  --region R             region of this host (default local)
  --catalog URL          sqlite (default) or etcd://h1:2379,h2:2379 ($TARMAC_CATALOG)
  --runtime NAME         default machine runtime: runc, crun or runsc (default runc)
  --no-install           never apt-get install missing packages
  --log-level L          trace|debug|info|warn|error (default info)
`;

/** Builds the host config from flags, environment and an optional file (flags win). */
export async function hostConfigFromArgs(argv: string[], env: NodeJS.ProcessEnv): Promise<ReturnType<typeof parseHostConfig>> {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      config: { type: 'string' }, 'data-dir': { type: 'string' }, 'api-listen': { type: 'string' },
      'proxy-listen': { type: 'string' }, 'apps-domain': { type: 'string' }, region: { type: 'string' },
      runtime: { type: 'string' }, 'no-install': { type: 'boolean' }, 'log-level': { type: 'string' },
      catalog: { type: 'string' }, 'metrics-listen': { type: 'string' }, 'dns-listen': { type: 'string' }, 'proxy-workers': { type: 'string' }, 'proxy-engine': { type: 'string' },
      'proxy-backhaul-listen': { type: 'string' }, 'proxy-https-listen': { type: 'string' }, role: { type: 'string' },
      'mesh-endpoint': { type: 'string' }, 'dns-engine': { type: 'string' },
    },
  });
  const input: Record<string, unknown> = values.config ? { ...(await readConfigFile(values.config)) } : {};
  const dataDir = values['data-dir'] ?? env['TARMAC_DATA_DIR'];
  if (dataDir) input['data_dir'] = dataDir;
  if (values['api-listen']) input['api'] = parseListen(values['api-listen'], '--api-listen');
  if (values['metrics-listen']) input['metrics'] = parseListen(values['metrics-listen'], '--metrics-listen');
  if (values['dns-listen']) input['dns'] = { ...(input['dns'] as object | undefined), listen: parseListen(values['dns-listen'], '--dns-listen') };
  if (values['dns-engine']) input['dns'] = { ...(input['dns'] as object | undefined), engine: values['dns-engine'] };
  const proxy = { ...(input['proxy'] as object | undefined) } as Record<string, unknown>;
  if (values['proxy-listen']) proxy['http'] = parseListen(values['proxy-listen'], '--proxy-listen');
  if (values['proxy-https-listen']) proxy['https'] = parseListen(values['proxy-https-listen'], '--proxy-https-listen');
  if (values['apps-domain']) proxy['apps_domain'] = values['apps-domain'];
  if (values['proxy-workers']) proxy['workers'] = Number(values['proxy-workers']);
  if (values['proxy-engine']) proxy['engine'] = values['proxy-engine'];
  if (values['proxy-backhaul-listen']) proxy['backhaul'] = parseListen(values['proxy-backhaul-listen'], '--proxy-backhaul-listen');
  if (Object.keys(proxy).length) input['proxy'] = proxy;
  if (values.region) input['region'] = values.region;
  if (values['mesh-endpoint']) {
    const endpoint = values['mesh-endpoint'];
    input['mesh'] = { ...(input['mesh'] as object | undefined), enabled: true, endpoint, listen_port: parseListen(endpoint, '--mesh-endpoint').port };
  }
  if (values.role) input['roles'] = values.role.split(',').map((r) => r.trim());
  if (values.catalog ?? env['TARMAC_CATALOG']) input['catalog'] = values.catalog ?? env['TARMAC_CATALOG'];
  if (values.runtime) input['runtime'] = { ...(input['runtime'] as object | undefined), default: values.runtime };
  if (values['no-install']) input['install_packages'] = false;
  if (values['log-level'] ?? env['TARMAC_LOG_LEVEL']) input['log_level'] = values['log-level'] ?? env['TARMAC_LOG_LEVEL'];
  return parseHostConfig(input as HostConfigInput, values.config ? `config (${values.config} and flags)` : 'flags');
}

export async function runHost(argv: string[]): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(hostUsage);
    return 0;
  }
  let config;
  try {
    config = await hostConfigFromArgs(argv, process.env);
  } catch (e) {
    process.stderr.write(`Error: ${errorMessage(e)}\n`);
    return 2;
  }
  const log = createLogger({ level: config.log_level, name: 'tarmac' });
  let host;
  try {
    host = await startHost(config, log);
  } catch (e) {
    if (!isTarmacError(e)) log.error({ err: e }, 'host failed to start');
    const hint = (e as NodeJS.ErrnoException).code === 'EADDRINUSE' ? ' (is another Tarmac host running? pick other ports with --api-listen/--proxy-listen)' : '';
    process.stderr.write(`Error: ${errorMessage(e)}${hint}\n`);
    return 1;
  }
  const tokenNote = process.env['TARMAC_API_TOKEN'] ? 'the token in $TARMAC_API_TOKEN' : `the token in ${join(config.data_dir, 'admin-token')}`;
  process.stderr.write(
    `Tarmac is running (${config.roles.join(', ')}).\n${host.apiUrl ? `  Machines API  ${host.apiUrl}/v1  (Authorization: Bearer <${tokenNote}>)\n` : ''}` +
    `  Proxy         http://<app>.${config.proxy.apps_domain}:${host.proxy?.address.port}\n` +
    `  HTTPS         https://<app>.${config.proxy.apps_domain}:${host.proxy?.httpsAddress?.port} (self-signed until you add a certificate)\n  Metrics       ${host.metricsUrl}\n${host.dns ? `  DNS           ${host.dns.listening().map((l) => `${l.host}:${l.port}`).join(', ')} (.internal names)\n` : ''}  Data          ${config.data_dir}\nPress Ctrl-C to stop.\n`,
  );
  await new Promise<void>((resolve) => {
    const stop = () => resolve();
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
  process.stderr.write('Stopping (machines keep running and are reattached on the next start)…\n');
  await host.close();
  return 0;
}
