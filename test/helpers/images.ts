// Builds small busybox test images with umoci and pushes them to a test registry with skopeo.
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile, chmod } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { makeBusyboxRootfs } from './rootfs.ts';

const run = promisify(execFile);

export interface TestImageLayer {
  /** Files to add in this layer (path → content; executable under bin/ or cgi-bin/). */
  files?: Record<string, string>;
  /** Paths (absolute or relative to /) to delete in this layer: each becomes a real whiteout entry. */
  remove?: string[];
}

export interface TestImageOptions {
  /** Extra files in the base busybox layer. */
  files?: Record<string, string>;
  entrypoint?: string[];
  cmd?: string[];
  /** "KEY=value" entries. */
  env?: string[];
  /** Layers stacked on top of the base layer, in order. */
  extraLayers?: TestImageLayer[];
  /** Default "latest". */
  tag?: string;
  /** Manifest format pushed: OCI (default) or Docker schema 2 ("v2s2"). */
  format?: 'oci' | 'v2s2';
  /** Image config labels. */
  labels?: Record<string, string>;
}

async function cmd(bin: string, args: string[]): Promise<void> {
  try {
    await run(bin, args, { maxBuffer: 16 << 20 });
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    throw new Error(`${bin} ${args.join(' ')} failed: ${err.stderr?.trim() || err.message}`, { cause: e });
  }
}

/** Builds a busybox image and pushes it to `registryHost`; returns the full reference "HOST/NAME:TAG". */
export async function buildAndPushImage(registryHost: string, name: string, opts: TestImageOptions = {}): Promise<string> {
  const tag = opts.tag ?? 'latest';
  const work = await mkdtemp(join(tmpdir(), 'tarmac-image-'));
  try {
    const layout = join(work, 'layout');
    const image = `${layout}:${tag}`;
    await cmd('umoci', ['init', '--layout', layout]);
    await cmd('umoci', ['new', '--image', image]);
    const base = await makeBusyboxRootfs(join(work, 'base'), opts.files ?? {});
    await cmd('umoci', ['insert', '--image', image, '--no-history', base, '/']);
    let n = 0;
    for (const layer of opts.extraLayers ?? []) {
      n++;
      const files = Object.entries(layer.files ?? {});
      if (files.length > 0) {
        const dir = join(work, `layer-${n}`);
        for (const [path, content] of files) {
          const full = join(dir, path);
          await mkdir(join(full, '..'), { recursive: true });
          await writeFile(full, content);
          if (/(^|\/)(bin|cgi-bin)\//.test(path)) await chmod(full, 0o755);
        }
        await cmd('umoci', ['insert', '--image', image, '--no-history', dir, '/']);
      }
      // umoci writes one layer per insert; several removals make several one-entry layers.
      for (const path of layer.remove ?? []) {
        await cmd('umoci', ['insert', '--image', image, '--no-history', '--whiteout', path.startsWith('/') ? path : `/${path}`]);
      }
    }
    const config: string[] = ['config', '--image', image, '--no-history'];
    if (opts.entrypoint) {
      config.push('--clear=config.entrypoint');
      for (const a of opts.entrypoint) config.push(`--config.entrypoint=${a}`);
    }
    if (opts.cmd) {
      config.push('--clear=config.cmd');
      for (const a of opts.cmd) config.push(`--config.cmd=${a}`);
    }
    for (const e of opts.env ?? ['PATH=/bin']) config.push(`--config.env=${e}`);
    for (const [k, v] of Object.entries(opts.labels ?? {})) config.push(`--config.label=${k}=${v}`);
    await cmd('umoci', config);
    const dest = `${registryHost}/${name}:${tag}`;
    const copy = ['copy', '--quiet', '--dest-tls-verify=false'];
    if (opts.format === 'v2s2') copy.push('--format=v2s2');
    copy.push(`oci:${layout}:${tag}`, `docker://${dest}`);
    await cmd('skopeo', copy);
    return dest;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** Shell line the http image runs: writes the hostname as the index page, then serves /var/www on :8080. */
export const httpImageCommand = 'hostname > /var/www/index.html; exec httpd -f -p 8080 -h /var/www';

/**
 * Pushes "HOST/http:latest": busybox httpd in the foreground on port 8080 (all addresses, IPv4 and IPv6),
 * `/` answers the hostname, `/cgi-bin/whoami` answers `hostname=<hostname>` and `machine_id=$FLY_MACHINE_ID`.
 */
export function httpImage(registryHost: string, opts: { name?: string; tag?: string } = {}): Promise<string> {
  return buildAndPushImage(registryHost, opts.name ?? 'http', {
    tag: opts.tag ?? 'latest',
    files: {
      'var/www/cgi-bin/whoami': [
        '#!/bin/sh',
        'printf "Content-Type: text/plain\\r\\n\\r\\n"',
        'echo "hostname=$(hostname)"',
        'echo "machine_id=$FLY_MACHINE_ID"',
        '',
      ].join('\n'),
    },
    cmd: ['sh', '-c', httpImageCommand],
    env: ['PATH=/bin'],
  });
}
