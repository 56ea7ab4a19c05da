// Image pulling and unpacking: the only file other folders import from orchestrator/images/.
export { ImageStore } from './store.ts';
export type { ImageProgress, PulledImage, ImageStoreOptions, PullOptions } from './store.ts';
export type { Credentials } from './registry.ts';
export { formatReference, type ParsedReference } from './reference.ts';
