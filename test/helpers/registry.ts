// Starts Debian's docker-registry (distribution 2.8) on a free loopback port for tests.
import { spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface TestRegistry {
  /** "127.0.0.1:PORT", usable as the registry part of an image reference. */
  host: string;
  /** Directory the registry stores its data in (docker/registry/v2/...). */
  storageDir: string;
  stop(): Promise<void>;
}

const registryBin = '/usr/bin/docker-registry';

/** Starts a registry with filesystem storage in a temp dir; resolves once `GET /v2/` answers. */
export async function startRegistry(opts: { port?: number; address?: string } = {}): Promise<TestRegistry> {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-registry-'));
  const storageDir = join(dir, 'data');
  let lastError = '';
  // A port picked by binding port 0 can be taken before the registry binds it: retry a few times.
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = opts.port ?? (await freePort());
    const host = `${opts.address ?? '127.0.0.1'}:${port}`;
    const configPath = join(dir, 'config.yml');
    await writeFile(configPath, [
      'version: 0.1',
      'log:',
      '  level: error',
      '  accesslog:',
      '    disabled: true',
      'storage:',
      '  filesystem:',
      `    rootdirectory: ${storageDir}`,
      '  delete:',
      '    enabled: true',
      'http:',
      `  addr: ${host}`,
      '',
    ].join('\n'));
    const child = spawn(registryBin, ['serve', configPath], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => { stderr = (stderr + d).slice(-4000); });
    let exited = false;
    const exitedPromise = new Promise<void>((resolve) => child.once('exit', () => { exited = true; resolve(); }));
    child.once('error', (e) => { stderr += String(e); });
    const deadline = Date.now() + 15_000;
    let ready = false;
    while (!exited && Date.now() < deadline) {
      try {
        const res = await fetch(`http://${host}/v2/`, { signal: AbortSignal.timeout(1000) });
        await res.arrayBuffer();
        if (res.status === 200) { ready = true; break; }
      } catch { /* not listening yet */ }
      await new Promise((r) => setTimeout(r, 50));
    }
    if (ready) {
      return {
        host,
        storageDir,
        async stop() {
          if (!exited) {
            child.kill('SIGTERM');
            const killTimer = setTimeout(() => child.kill('SIGKILL'), 3000);
            await exitedPromise;
            clearTimeout(killTimer);
          }
          await rm(dir, { recursive: true, force: true });
        },
      };
    }
    if (!exited) { child.kill('SIGKILL'); await exitedPromise; }
    lastError = stderr.trim() || 'registry did not answer GET /v2/ in time';
  }
  await rm(dir, { recursive: true, force: true });
  throw new Error(`docker-registry failed to start: ${lastError}`);
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}
