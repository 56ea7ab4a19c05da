// Parses image references ("nginx", "127.0.0.1:5000/app:v1", "reg/app@sha256:…") with Docker Hub's defaults.
import { TarmacError } from '../../shared/errors.ts';

export interface ParsedReference {
  /** Registry host[:port], e.g. "registry-1.docker.io" or "127.0.0.1:5000". */
  registry: string;
  /** Repository path, e.g. "library/nginx". */
  repository: string;
  /** Tag; "latest" when neither tag nor digest is given, "" for a reference by digest only. */
  tag: string;
  /** "sha256:<64 hex>" when the reference pins a digest. */
  digest?: string;
}

export const dockerHubRegistry = 'registry-1.docker.io';
const dockerHubAliases = new Set(['docker.io', 'index.docker.io', 'registry-1.docker.io', 'registry.hub.docker.com']);

// The grammar of github.com/distribution/reference.
const pathComponent = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const tagPattern = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;
const digestPattern = /^sha256:[a-f0-9]{64}$/;
const hostPattern = /^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)(?::[0-9]{1,5})?$/;

function invalid(ref: string, why: string): TarmacError {
  return new TarmacError('invalid_argument', `image reference "${ref}" is not valid: ${why}`);
}

export function parseReference(ref: string): ParsedReference {
  if (typeof ref !== 'string' || ref.length === 0) throw invalid(String(ref), 'it is empty');
  if (ref.length > 1024) throw invalid(ref.slice(0, 64) + '…', 'it is longer than 1024 characters');
  if (/\s/.test(ref)) throw invalid(ref, 'it contains whitespace');

  let rest = ref;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!digestPattern.test(digest)) {
      throw invalid(ref, digest.startsWith('sha256:') ? 'the digest must be sha256: followed by 64 lowercase hex digits' : 'only sha256 digests are supported');
    }
  }

  let tag = '';
  const lastSlash = rest.lastIndexOf('/');
  const lastColon = rest.lastIndexOf(':');
  if (lastColon > lastSlash) {
    tag = rest.slice(lastColon + 1);
    rest = rest.slice(0, lastColon);
    if (!tagPattern.test(tag)) throw invalid(ref, `the tag "${tag}" must be 1-128 letters, digits, "_", "." or "-" and not start with "." or "-"`);
  }
  if (rest.length === 0) throw invalid(ref, 'the repository name is missing');

  let registry = dockerHubRegistry;
  let repository = rest;
  const firstSlash = rest.indexOf('/');
  if (firstSlash >= 0) {
    const first = rest.slice(0, firstSlash);
    if (first.includes('.') || first.includes(':') || first === 'localhost' || first.startsWith('[')) {
      if (!hostPattern.test(first)) throw invalid(ref, `the registry "${first}" is not a host name with an optional port`);
      registry = dockerHubAliases.has(first.toLowerCase()) ? dockerHubRegistry : first;
      repository = rest.slice(firstSlash + 1);
    }
  }
  for (const part of repository.split('/')) {
    if (!pathComponent.test(part)) {
      throw invalid(ref, part === '' ? 'the repository has an empty path component' : `the repository part "${part}" must be lowercase letters and digits separated by ".", "_", "__" or "-"`);
    }
  }
  if (registry === dockerHubRegistry && !repository.includes('/')) repository = `library/${repository}`;
  if (repository.length > 255) throw invalid(ref, 'the repository name is longer than 255 characters');
  if (tag === '' && digest === undefined) tag = 'latest';
  return digest === undefined ? { registry, repository, tag } : { registry, repository, tag, digest };
}

/** "registry/repository:tag" or "registry/repository@digest", for messages and cache keys. */
export function formatReference(r: ParsedReference): string {
  return `${r.registry}/${r.repository}${r.tag ? `:${r.tag}` : ''}${r.digest ? `@${r.digest}` : ''}`;
}
