// Starts a whole Tarmac host in a temp data dir on free ports, and tears it and its machines down.
import { mkdtemp, readFile } from 'node:fs/promises';
import { listMachineNetworks } from '../../src/orchestrator/index.ts';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startHost, parseHostConfig, type RunningHost, type HostConfigInput } from '../../src/host/index.ts';
import { TarmacClient } from '../../src/client/index.ts';
import { machineDebris, removeDebris } from './host-process.ts';
import { silentLogger } from '../../src/shared/log.ts';

export interface TestHost {
  host: RunningHost;
  client: TarmacClient;
  dataDir: string;
  proxyUrl: string;
  /** Closes the host only (machines keep running), for restart tests. */
  stopHostOnly(): Promise<void>;
  /** Starts a new host on the same data dir (after stopHostOnly). */
  restart(): Promise<void>;
  /** Destroys every machine, closes the host, removes the data dir; fails if a machine left anything behind. */
  close(): Promise<void>;
}

export async function startTestHost(opts: { config?: HostConfigInput; dataDir?: string } = {}): Promise<TestHost> {
  const dataDir = opts.dataDir ?? (await mkdtemp(join(tmpdir(), 'tarmac-host-')));
  const config = parseHostConfig({
    data_dir: dataDir, api: { host: '127.0.0.1', port: 0 }, proxy: { http: { host: '127.0.0.1', port: 0 } }, metrics: { host: '127.0.0.1', port: 0 },
    install_packages: false, ...opts.config,
    // A free port for the operator's DNS listener too (hosts of parallel tests would compete for 127.0.0.1:5353).
    dns: { listen: { host: '127.0.0.1', port: 0 }, ...opts.config?.dns },
  });
  const env = { ...process.env };
  delete env['TARMAC_API_TOKEN'];
  const t: TestHost = {
    host: await startHost(config, silentLogger(), env),
    client: undefined as unknown as TarmacClient,
    dataDir,
    proxyUrl: '',
    async stopHostOnly() {
      await t.host.close();
    },
    async restart() {
      // A restarted host keeps its ports free for the OS to reuse: take new ones.
      t.host = await startHost(config, silentLogger(), env);
      wire();
    },
    async close() {
      const ids = t.host.catalog.listMachines({ include_deleted: true }).map((m) => m.spec.id);
      try {
        await destroyAll(t);
      } finally {
        await t.host.close();
        const debris = await machineDebris(dataDir, ids);
        await removeDebris(dataDir, ids);
        if (debris.length > 0) throw new Error(`machines left debris: ${debris.join(', ')}`);
      }
    },
  };
  const wire = () => {
    t.client = new TarmacClient({ baseUrl: t.host.apiUrl!, token: t.host.adminToken });
    t.proxyUrl = `http://127.0.0.1:${t.host.proxy!.address.port}`;
  };
  wire();
  return t;
}

/** Force-destroys every machine of every app and waits until the orchestrator has removed them. */
async function destroyAll(t: TestHost): Promise<void> {
  const apps = t.host.catalog.listApps();
  for (const app of apps) await t.client.deleteApp(app.name).catch(() => {});
  await t.host.orchestrator?.idle();
  const left = t.host.catalog.listMachines({ include_deleted: false });
  if (left.length > 0) throw new Error(`machines left after cleanup: ${left.map((m) => m.spec.id).join(', ')}`);
}


/** Network namespaces of machines that exist on this machine (any host's: prefer machineDebris for one host's own). */
export async function machineNamespaces(): Promise<string[]> {
  return listMachineNetworks();
}

export async function mounts(): Promise<string> {
  return readFile('/proc/self/mountinfo', 'utf8');
}
