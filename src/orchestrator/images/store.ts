// The image store: resolves references, downloads verified blobs into a shared OCI layout, unpacks with umoci.
import { createHash, randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { mkdir, readFile, readdir, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { Readable, Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { ReadableStream as WebReadableStream } from 'node:stream/web';
import type { ImageRef } from '../../catalog/types.ts';
import { TarmacError, errorMessage } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';
import type { ImageConfig } from '../driver.ts';
import { formatReference, parseReference, type ParsedReference } from './reference.ts';
import { RegistryClient, isUnreachable, type Credentials } from './registry.ts';

export interface ImageProgress {
  phase: 'resolving' | 'downloading' | 'unpacking' | 'done';
  ref: string;
  /** Digest of the blob being downloaded. */
  layer?: string;
  /** Bytes of `layer` received so far. */
  bytes?: number;
  /** Size of `layer`. */
  total?: number;
}

export interface PulledImage {
  /** registry, repository, tag, digest (what the reference resolved to: an index or a manifest), labels. */
  ref: ImageRef;
  /** Absolute path of the unpacked root filesystem, shared between machines: treat as read-only. */
  rootfs: string;
  config: ImageConfig;
}

export interface ImageStoreOptions {
  /** Directory of the store: an OCI image layout (oci-layout, index.json, blobs/sha256) plus rootfs/ and tmp/. */
  dir: string;
  log: Logger;
  /** Registries ("host" or "host:port") reached over plain HTTP besides localhost, 127.0.0.1 and [::1]. */
  insecureRegistries?: string[];
  credentials?: (registry: string) => Credentials | undefined;
  /** umoci binary; default "umoci" from PATH. */
  umoci?: string;
}

export interface PullOptions {
  onProgress?: (p: ImageProgress) => void;
  signal?: AbortSignal;
}

const mt = {
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociConfig: 'application/vnd.oci.image.config.v1+json',
  dockerList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerConfig: 'application/vnd.docker.container.image.v1+json',
} as const;
const manifestAccept = [mt.ociIndex, mt.ociManifest, mt.dockerList, mt.dockerManifest].join(', ');

/** Layer media types we unpack, mapped to the OCI type umoci understands. */
const layerTypes: Record<string, string> = {
  'application/vnd.oci.image.layer.v1.tar': 'application/vnd.oci.image.layer.v1.tar',
  'application/vnd.oci.image.layer.v1.tar+gzip': 'application/vnd.oci.image.layer.v1.tar+gzip',
  'application/vnd.oci.image.layer.nondistributable.v1.tar': 'application/vnd.oci.image.layer.v1.tar',
  'application/vnd.oci.image.layer.nondistributable.v1.tar+gzip': 'application/vnd.oci.image.layer.v1.tar+gzip',
  'application/vnd.docker.image.rootfs.diff.tar.gzip': 'application/vnd.oci.image.layer.v1.tar+gzip',
  'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip': 'application/vnd.oci.image.layer.v1.tar+gzip',
};

const maxManifestBytes = 4 << 20;
const maxConfigBytes = 8 << 20;
const digestPattern = /^sha256:[a-f0-9]{64}$/;
const goArch: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ia32: '386', ppc64: 'ppc64le', s390x: 's390x', riscv64: 'riscv64' };

interface Descriptor { mediaType: string; digest: string; size: number; platform?: { os?: string; architecture?: string; variant?: string } }
interface Manifest { mediaType: string; config: Descriptor; layers: Descriptor[] }
interface Emit { (p: Omit<ImageProgress, 'ref'>): void }

/** Work shared by every caller that asks for the same thing; aborted only when all its callers gave up. */
class Shared<T> {
  private readonly controller = new AbortController();
  private waiting = 0;
  private readonly listeners = new Set<Emit>();
  readonly promise: Promise<T>;
  constructor(work: (signal: AbortSignal, emit: Emit) => Promise<T>, private readonly onAbandon: () => void) {
    const emit: Emit = (p) => { for (const l of this.listeners) l(p); };
    this.promise = work(this.controller.signal, emit);
    this.promise.catch(() => {});
  }
  get abandoned(): boolean {
    return this.controller.signal.aborted;
  }
  join(signal: AbortSignal | undefined, listener: Emit | undefined): Promise<T> {
    return new Promise<T>((resolvePromise, reject) => {
      let settled = false;
      this.waiting++;
      if (listener) this.listeners.add(listener);
      const leave = (): void => {
        settled = true;
        this.waiting--;
        if (listener) this.listeners.delete(listener);
        signal?.removeEventListener('abort', onAbort);
      };
      const onAbort = (): void => {
        if (settled) return;
        leave();
        reject(signal?.reason ?? new Error('aborted'));
        if (this.waiting === 0) {
          this.onAbandon();
          this.controller.abort(signal?.reason);
        }
      };
      if (signal?.aborted) return onAbort();
      signal?.addEventListener('abort', onAbort, { once: true });
      this.promise.then(
        (v) => { if (!settled) { leave(); resolvePromise(v); } },
        (e: unknown) => { if (!settled) { leave(); reject(e); } },
      );
    });
  }
}

function hexOf(digest: string): string {
  return digest.slice('sha256:'.length);
}

function sha256(buf: Buffer): string {
  return `sha256:${createHash('sha256').update(buf).digest('hex')}`;
}

function pullFailed(message: string, cause?: unknown): TarmacError {
  return new TarmacError('image_pull_failed', message, cause === undefined ? undefined : { cause });
}

function isStringArray(v: unknown): v is string[] {
  return Array.isArray(v) && v.every((s) => typeof s === 'string');
}

/** The ImageConfig fields of an image config blob's `config` object, with wrong types dropped. */
function pickConfig(raw: unknown): ImageConfig {
  const c = (raw && typeof raw === 'object' ? (raw as { config?: unknown }).config : undefined) ?? {};
  if (typeof c !== 'object' || c === null) return {};
  const o = c as Record<string, unknown>;
  const out: ImageConfig = {};
  if (isStringArray(o['Entrypoint'])) out.Entrypoint = o['Entrypoint'];
  if (isStringArray(o['Cmd'])) out.Cmd = o['Cmd'];
  if (isStringArray(o['Env'])) out.Env = o['Env'];
  if (typeof o['WorkingDir'] === 'string' && o['WorkingDir'] !== '') out.WorkingDir = o['WorkingDir'];
  if (typeof o['User'] === 'string' && o['User'] !== '') out.User = o['User'];
  if (typeof o['StopSignal'] === 'string' && o['StopSignal'] !== '') out.StopSignal = o['StopSignal'];
  const labels = o['Labels'];
  if (labels && typeof labels === 'object') {
    const l: Record<string, string> = {};
    for (const [k, v] of Object.entries(labels)) if (typeof v === 'string') l[k] = v;
    out.Labels = l;
  }
  return out;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(() => true, () => false);
}

/** What rootfs/<hex>/image.json records once an image is unpacked. */
interface UnpackedMeta { manifest: string; config: ImageConfig }

export class ImageStore {
  private readonly dir: string;
  private readonly log: Logger;
  private readonly umoci: string;
  private readonly client: RegistryClient;
  private readonly inflight = new Map<string, Shared<unknown>>();
  private ready: Promise<void> | undefined;
  /** Last digest each tag reference resolved to, for pulls while the registry is unreachable. */
  private tags: Record<string, string> = {};
  private writes: Promise<void> = Promise.resolve();

  constructor(opts: ImageStoreOptions) {
    this.dir = resolve(opts.dir);
    this.log = opts.log;
    this.umoci = opts.umoci ?? 'umoci';
    this.client = new RegistryClient({ log: opts.log, ...(opts.insecureRegistries ? { insecureRegistries: opts.insecureRegistries } : {}), ...(opts.credentials ? { credentials: opts.credentials } : {}) });
  }

  static parseReference(ref: string): { registry: string; repository: string; tag: string; digest?: string } {
    return parseReference(ref);
  }

  /** Resolves, downloads (verifying every blob's sha256), and unpacks; concurrent pulls of one image share the work. */
  async pull(reference: string, opts: PullOptions = {}): Promise<PulledImage> {
    const parsed = parseReference(reference);
    await this.init();
    const key = formatReference(parsed);
    const onProgress = opts.onProgress;
    const listener: Emit | undefined = onProgress ? (p) => { try { onProgress({ ...p, ref: reference }); } catch { /* a listener must not break the pull */ } } : undefined;
    listener?.({ phase: 'resolving' });
    const image = await this.share(`pull:${key}`, (signal, emit) => this.doPull(parsed, key, signal, emit), opts.signal, listener);
    listener?.({ phase: 'done' });
    return image;
  }

  private share<T>(key: string, work: (signal: AbortSignal, emit: Emit) => Promise<T>, signal: AbortSignal | undefined, listener: Emit | undefined): Promise<T> {
    let s = this.inflight.get(key) as Shared<T> | undefined;
    if (!s || s.abandoned) {
      const created: Shared<T> = new Shared<T>(work, () => { if (this.inflight.get(key) === created) this.inflight.delete(key); });
      s = created;
      this.inflight.set(key, created as Shared<unknown>);
      created.promise.then(
        () => { if (this.inflight.get(key) === created) this.inflight.delete(key); },
        () => { if (this.inflight.get(key) === created) this.inflight.delete(key); },
      );
    }
    return s.join(signal, listener);
  }

  private get blobsDir(): string { return join(this.dir, 'blobs', 'sha256'); }
  private get tmpDir(): string { return join(this.dir, 'tmp'); }
  private blobPath(digest: string): string { return join(this.blobsDir, hexOf(digest)); }
  private rootDir(manifestDigest: string): string { return join(this.dir, 'rootfs', hexOf(manifestDigest)); }

  private tmpName(what: string): string {
    return join(this.tmpDir, `${process.pid}-${randomBytes(6).toString('hex')}-${what}`);
  }

  private init(): Promise<void> {
    this.ready ??= (async () => {
      await mkdir(this.blobsDir, { recursive: true });
      await mkdir(join(this.dir, 'rootfs'), { recursive: true });
      await mkdir(this.tmpDir, { recursive: true });
      if (!(await exists(join(this.dir, 'oci-layout')))) await writeFile(join(this.dir, 'oci-layout'), '{"imageLayoutVersion":"1.0.0"}');
      if (!(await exists(join(this.dir, 'index.json')))) await this.writeAtomic(join(this.dir, 'index.json'), JSON.stringify({ schemaVersion: 2, mediaType: mt.ociIndex, manifests: [] }));
      this.tags = await readFile(join(this.dir, 'tags.json'), 'utf8').then((s) => JSON.parse(s) as Record<string, string>, () => ({}));
      // Temp files left by a process that died (a crash mid-download or mid-unpack).
      for (const name of await readdir(this.tmpDir)) {
        const pid = Number(name.split('-')[0]);
        if (pid !== process.pid && !(Number.isInteger(pid) && pid > 0 && pidAlive(pid))) await rm(join(this.tmpDir, name), { recursive: true, force: true });
      }
    })();
    this.ready.catch(() => { this.ready = undefined; });
    return this.ready;
  }

  private async writeAtomic(path: string, content: string): Promise<void> {
    const tmp = this.tmpName('write');
    await writeFile(tmp, content);
    await rename(tmp, path);
  }

  /** Serializes read-modify-write of the store's small JSON files. */
  private serial(fn: () => Promise<void>): Promise<void> {
    const next = this.writes.then(fn, fn);
    this.writes = next.catch(() => {});
    return next;
  }

  private async doPull(ref: ParsedReference, key: string, signal: AbortSignal, emit: Emit): Promise<PulledImage> {
    const what = formatReference(ref);
    let top: string;
    let offline = false;
    if (ref.digest) {
      top = ref.digest;
    } else {
      try {
        top = await this.resolveTag(ref, what, signal);
      } catch (e) {
        const cached = this.tags[key];
        if (!isUnreachable(e) || !cached) throw e;
        top = cached;
        offline = true;
        this.log.warn({ ref: what, digest: cached, err: errorMessage(e) }, 'registry unreachable, using the image pulled before');
      }
    }
    let manifestDigest: string;
    let manifest: Manifest;
    try {
      ({ digest: manifestDigest, manifest } = await this.platformManifest(ref, what, top, signal));
    } catch (e) {
      if (offline) throw pullFailed(`image "${what}" was pulled before but is not complete in the local store, and its registry is unreachable`, e);
      throw e;
    }
    const root = this.rootDir(manifestDigest);
    let meta = await readFile(join(root, 'image.json'), 'utf8').then((s) => JSON.parse(s) as UnpackedMeta, () => undefined);
    if (!meta) {
      if (offline) throw pullFailed(`image "${what}" is not unpacked locally and its registry ${ref.registry} is unreachable`);
      meta = await this.share(`unpack:${manifestDigest}`, (s, e) => this.unpack(ref, what, manifestDigest, manifest, s, e), signal, emit);
    }
    if (!ref.digest && this.tags[key] !== top) {
      await this.serial(async () => {
        this.tags[key] = top;
        await this.writeAtomic(join(this.dir, 'tags.json'), JSON.stringify(this.tags, null, 1));
      });
    }
    this.log.info({ ref: what, digest: top, manifest: manifestDigest, offline }, 'image ready');
    return {
      ref: { registry: ref.registry, repository: ref.repository, tag: ref.tag, digest: top, labels: { ...(meta.config.Labels ?? {}) } },
      rootfs: join(root, 'rootfs'),
      config: meta.config,
    };
  }

  /** Tag → digest: a HEAD when the registry names the digest and we hold that manifest, else a GET stored as a blob. */
  private async resolveTag(ref: ParsedReference, what: string, signal: AbortSignal): Promise<string> {
    const head = await this.client.request(ref.registry, ref.repository, `manifests/${ref.tag}`, { method: 'HEAD', accept: manifestAccept, signal });
    if (head.status === 404) throw this.notFound(ref, what);
    const headDigest = head.headers.get('docker-content-digest');
    if (head.ok && headDigest && digestPattern.test(headDigest) && (await exists(this.blobPath(headDigest)))) return headDigest;
    const { digest } = await this.fetchManifest(ref, what, ref.tag, undefined, signal);
    return digest;
  }

  private notFound(ref: ParsedReference, what: string): TarmacError {
    return pullFailed(`image "${what}" not found in registry ${ref.registry}: check the repository name and ${ref.digest ? 'digest' : `tag "${ref.tag}"`}`);
  }

  /** GETs a manifest by tag or digest, verifies it, and stores it as a blob. */
  private async fetchManifest(ref: ParsedReference, what: string, reference: string, expected: string | undefined, signal: AbortSignal): Promise<{ digest: string; body: Buffer }> {
    const res = await this.client.request(ref.registry, ref.repository, `manifests/${reference}`, { accept: manifestAccept, signal });
    if (res.status === 404) {
      await res.body?.cancel().catch(() => {});
      throw this.notFound(ref, what);
    }
    if (!res.ok) {
      const text = await res.text().catch(() => '');
      throw pullFailed(`registry ${ref.registry} answered HTTP ${res.status} for the manifest of "${what}"${text ? `: ${text.slice(0, 200).trim()}` : ''}`);
    }
    const length = Number(res.headers.get('content-length') ?? 0);
    if (length > maxManifestBytes) throw pullFailed(`the manifest of "${what}" is larger than ${maxManifestBytes} bytes`);
    const body = Buffer.from(await res.arrayBuffer());
    if (body.length > maxManifestBytes) throw pullFailed(`the manifest of "${what}" is larger than ${maxManifestBytes} bytes`);
    const digest = sha256(body);
    const claimed = res.headers.get('docker-content-digest');
    const want = expected ?? (claimed && digestPattern.test(claimed) ? claimed : undefined);
    if (want && want !== digest) throw pullFailed(`the manifest of "${what}" does not match its digest (expected ${want}, got ${digest}): the registry or something between us corrupted it`);
    if (!(await exists(this.blobPath(digest)))) {
      const tmp = this.tmpName('manifest');
      await writeFile(tmp, body);
      await rename(tmp, this.blobPath(digest));
    }
    return { digest, body };
  }

  /** A manifest by digest, from the store when present (manifests are content-addressed too). */
  private async manifestBytes(ref: ParsedReference, what: string, digest: string, signal: AbortSignal): Promise<Buffer> {
    const local = await readFile(this.blobPath(digest)).catch(() => undefined);
    if (local && sha256(local) === digest) return local;
    return (await this.fetchManifest(ref, what, digest, digest, signal)).body;
  }

  /** Follows an index to the manifest for this host's platform (linux/<arch>). */
  private async platformManifest(ref: ParsedReference, what: string, digest: string, signal: AbortSignal): Promise<{ digest: string; manifest: Manifest }> {
    const arch = goArch[process.arch] ?? process.arch;
    let current = digest;
    for (let depth = 0; depth < 3; depth++) {
      const body = await this.manifestBytes(ref, what, current, signal);
      let doc: Record<string, unknown>;
      try {
        doc = JSON.parse(body.toString('utf8')) as Record<string, unknown>;
      } catch (e) {
        throw pullFailed(`the manifest of "${what}" is not valid JSON`, e);
      }
      const mediaType = typeof doc['mediaType'] === 'string' ? doc['mediaType'] : Array.isArray(doc['manifests']) ? mt.ociIndex : Array.isArray(doc['layers']) ? mt.ociManifest : '';
      if (mediaType === mt.ociIndex || mediaType === mt.dockerList) {
        const entries = (Array.isArray(doc['manifests']) ? doc['manifests'] : []) as Descriptor[];
        const candidates = entries.filter((m) => m && typeof m.digest === 'string' && digestPattern.test(m.digest) && m.platform?.os === 'linux' && m.platform.architecture === arch);
        const pick = candidates.find((m) => arch !== 'arm' || m.platform?.variant === 'v7') ?? candidates[0];
        if (!pick) {
          const have = entries.map((m) => (m?.platform ? `${m.platform.os}/${m.platform.architecture}${m.platform.variant ? `/${m.platform.variant}` : ''}` : '?')).filter((p) => p !== 'unknown/unknown');
          throw pullFailed(`image "${what}" has no linux/${arch} variant (it has: ${have.join(', ') || 'none'})`);
        }
        current = pick.digest;
        continue;
      }
      if (mediaType !== mt.ociManifest && mediaType !== mt.dockerManifest) {
        throw pullFailed(`image "${what}" has a manifest of type "${mediaType || 'unknown'}", which Tarmac cannot run (it needs an OCI or Docker schema 2 image)`);
      }
      return { digest: current, manifest: this.checkManifest(what, doc, mediaType) };
    }
    throw pullFailed(`image "${what}" nests image indexes too deeply`);
  }

  private checkManifest(what: string, doc: Record<string, unknown>, mediaType: string): Manifest {
    const isDesc = (d: unknown): d is Descriptor => !!d && typeof d === 'object' && typeof (d as Descriptor).digest === 'string' && digestPattern.test((d as Descriptor).digest) && Number.isSafeInteger((d as Descriptor).size) && (d as Descriptor).size >= 0 && typeof (d as Descriptor).mediaType === 'string';
    const config = doc['config'];
    const layers = doc['layers'];
    if (!isDesc(config) || !Array.isArray(layers) || !layers.every(isDesc)) throw pullFailed(`the manifest of "${what}" is malformed (config or layers missing, or a digest that is not sha256)`);
    if (config.mediaType !== mt.ociConfig && config.mediaType !== mt.dockerConfig) throw pullFailed(`"${what}" is not a container image (its config has media type ${config.mediaType})`);
    for (const l of layers) {
      if (!layerTypes[l.mediaType]) throw pullFailed(`image "${what}" has a layer of type ${l.mediaType}, which Tarmac cannot unpack (gzip or uncompressed tar layers only)`);
    }
    if (config.size > maxConfigBytes) throw pullFailed(`the config of "${what}" is larger than ${maxConfigBytes} bytes`);
    return { mediaType, config, layers };
  }

  /** Downloads a blob into the store unless present, checking size and sha256 while it streams. */
  private ensureBlob(ref: ParsedReference, what: string, desc: Descriptor, signal: AbortSignal, emit: Emit): Promise<void> {
    return this.share(`blob:${desc.digest}`, async (s, e) => {
      const path = this.blobPath(desc.digest);
      const st = await stat(path).catch(() => undefined);
      if (st && st.size === desc.size) return;
      await this.download(ref, what, desc, path, s, e);
    }, signal, emit);
  }

  private async download(ref: ParsedReference, what: string, desc: Descriptor, path: string, signal: AbortSignal, emit: Emit): Promise<void> {
    const res = await this.client.request(ref.registry, ref.repository, `blobs/${desc.digest}`, { accept: '*/*', signal });
    if (!res.ok || !res.body) {
      await res.body?.cancel().catch(() => {});
      if (res.status === 404) throw pullFailed(`blob ${desc.digest} of image "${what}" is missing from registry ${ref.registry}`);
      throw pullFailed(`registry ${ref.registry} answered HTTP ${res.status} for blob ${desc.digest} of "${what}"`);
    }
    const hash = createHash('sha256');
    let bytes = 0;
    let lastEmit = 0;
    emit({ phase: 'downloading', layer: desc.digest, bytes: 0, total: desc.size });
    const meter = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        bytes += chunk.length;
        if (bytes > desc.size) return cb(pullFailed(`blob ${desc.digest} of "${what}" is larger than its manifest says (${desc.size} bytes): the registry sent something else`));
        hash.update(chunk);
        const now = Date.now();
        if (now - lastEmit >= 100) {
          lastEmit = now;
          emit({ phase: 'downloading', layer: desc.digest, bytes, total: desc.size });
        }
        cb(null, chunk);
      },
    });
    const tmp = this.tmpName('blob');
    try {
      await pipeline(Readable.fromWeb(res.body as WebReadableStream<Uint8Array>), meter, createWriteStream(tmp), { signal });
      const got = `sha256:${hash.digest('hex')}`;
      if (bytes !== desc.size) throw pullFailed(`blob ${desc.digest} of "${what}" is truncated: got ${bytes} of ${desc.size} bytes`);
      if (got !== desc.digest) throw pullFailed(`blob ${desc.digest} of "${what}" does not match its digest (got ${got}): the registry or something between us corrupted it`);
      await rename(tmp, path);
    } catch (e) {
      await rm(tmp, { force: true });
      if (signal.aborted) throw signal.reason ?? e;
      if (e instanceof TarmacError) throw e;
      throw pullFailed(`downloading blob ${desc.digest} of "${what}" from ${ref.registry} failed: ${errorMessage(e)}`, e);
    }
    emit({ phase: 'downloading', layer: desc.digest, bytes, total: desc.size });
    this.log.debug({ ref: what, digest: desc.digest, bytes }, 'blob downloaded');
  }

  /** Downloads the config and layers, then unpacks with umoci into a temp dir renamed into place. */
  private async unpack(ref: ParsedReference, what: string, manifestDigest: string, manifest: Manifest, signal: AbortSignal, emit: Emit): Promise<UnpackedMeta> {
    const blobs = [manifest.config, ...manifest.layers];
    // A few downloads at a time; layers shared with images already pulled are skipped.
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < blobs.length) {
        const desc = blobs[next++];
        if (desc) await this.ensureBlob(ref, what, desc, signal, emit);
      }
    };
    await Promise.all([worker(), worker(), worker()]);
    const configBody = await readFile(this.blobPath(manifest.config.digest));
    let config: ImageConfig;
    try {
      config = pickConfig(JSON.parse(configBody.toString('utf8')));
    } catch (e) {
      throw pullFailed(`the config of "${what}" is not valid JSON`, e);
    }

    // umoci reads OCI media types only: describe Docker images to it with an equivalent OCI manifest.
    let ociDigest = manifestDigest;
    let ociSize = (await stat(this.blobPath(manifestDigest))).size;
    if (manifest.mediaType !== mt.ociManifest || manifest.config.mediaType !== mt.ociConfig || manifest.layers.some((l) => layerTypes[l.mediaType] !== l.mediaType)) {
      const converted = Buffer.from(JSON.stringify({
        schemaVersion: 2,
        mediaType: mt.ociManifest,
        config: { mediaType: mt.ociConfig, digest: manifest.config.digest, size: manifest.config.size },
        layers: manifest.layers.map((l) => ({ mediaType: layerTypes[l.mediaType], digest: l.digest, size: l.size })),
      }));
      ociDigest = sha256(converted);
      ociSize = converted.length;
      if (!(await exists(this.blobPath(ociDigest)))) {
        const tmp = this.tmpName('manifest');
        await writeFile(tmp, converted);
        await rename(tmp, this.blobPath(ociDigest));
      }
    }

    emit({ phase: 'unpacking' });
    const work = this.tmpName('unpack');
    try {
      // A one-image layout over the shared blobs, so concurrent unpacks never touch a shared index.json.
      const layout = join(work, 'layout');
      await mkdir(layout, { recursive: true });
      await writeFile(join(layout, 'oci-layout'), '{"imageLayoutVersion":"1.0.0"}');
      await writeFile(join(layout, 'index.json'), JSON.stringify({
        schemaVersion: 2,
        manifests: [{ mediaType: mt.ociManifest, digest: ociDigest, size: ociSize, annotations: { 'org.opencontainers.image.ref.name': 'image' } }],
      }));
      await mkdir(join(layout, 'blobs'));
      await symlink(this.blobsDir, join(layout, 'blobs', 'sha256'));
      await this.runUmoci(['raw', 'unpack', '--image', `${layout}:image`, join(work, 'rootfs')], what, signal);
      await rm(layout, { recursive: true, force: true });
      const meta: UnpackedMeta = { manifest: manifestDigest, config };
      await writeFile(join(work, 'image.json'), JSON.stringify(meta));
      try {
        await rename(work, this.rootDir(manifestDigest));
      } catch (e) {
        // Another process unpacked the same image first: keep theirs.
        if (!(await exists(join(this.rootDir(manifestDigest), 'image.json')))) throw e;
        await rm(work, { recursive: true, force: true });
      }
    } catch (e) {
      await rm(work, { recursive: true, force: true });
      throw e;
    }
    await this.recordInIndex(what, ociDigest, ociSize);
    this.log.info({ ref: what, manifest: manifestDigest, layers: manifest.layers.length }, 'image unpacked');
    return { manifest: manifestDigest, config };
  }

  /** Keeps the store's index.json naming every image pulled, so the store is a valid OCI layout for tools. */
  private recordInIndex(what: string, digest: string, size: number): Promise<void> {
    return this.serial(async () => {
      const path = join(this.dir, 'index.json');
      const index = await readFile(path, 'utf8').then((s) => JSON.parse(s) as { manifests?: Array<{ annotations?: Record<string, string> }> }, () => ({ manifests: [] }));
      const manifests = (index.manifests ?? []).filter((m) => m.annotations?.['org.opencontainers.image.ref.name'] !== what);
      manifests.push({ mediaType: mt.ociManifest, digest, size, annotations: { 'org.opencontainers.image.ref.name': what } } as { annotations: Record<string, string> });
      await this.writeAtomic(path, JSON.stringify({ schemaVersion: 2, mediaType: mt.ociIndex, manifests }));
    });
  }

  private runUmoci(args: string[], what: string, signal: AbortSignal): Promise<void> {
    return new Promise((resolvePromise, reject) => {
      execFile(this.umoci, args, { signal, maxBuffer: 4 << 20 }, (err, _stdout, stderr) => {
        if (!err) return resolvePromise();
        if (signal.aborted) return reject(signal.reason ?? err);
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') return reject(pullFailed(`cannot unpack "${what}": the umoci binary "${this.umoci}" was not found (install the umoci package)`, err));
        reject(pullFailed(`unpacking "${what}" with umoci failed: ${String(stderr).trim().split('\n').slice(-3).join(' ') || err.message}`, err));
      });
    });
  }

  /** Closes the registry connections. Pulls in flight fail. */
  async close(): Promise<void> {
    await this.client.close();
  }
}
