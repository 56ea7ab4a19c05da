// The catalog's public face: fleet state types, the Catalog contract, its backends and addressing.
export type * from './types.ts';
export { machineStates } from './types.ts';
export * from './machine-config.ts';
export { openSqliteCatalog } from './sqlite.ts';
export { openEtcdCatalog, type EtcdCatalog, type EtcdCatalogOptions } from './etcd.ts';
export { machineAddress, networkPrefix } from './addressing.ts';
