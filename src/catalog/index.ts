// The catalog's public face: fleet state types, the Catalog contract, its backends and addressing.
export type * from './types.ts';
export { machineStates, machineStarted } from './types.ts';
export * from './machine-config.ts';
export { openSqliteCatalog } from './sqlite.ts';
export { openEtcdCatalog, type EtcdCatalog, type EtcdCatalogOptions } from './etcd.ts';
export { machineAddress, networkCidr, networkPrefix, privateDnsAddress } from './addressing.ts';
export { certificateFromPem, certificateHostnamePattern, isCertificateProblem, type CertificateProblem } from './certificates.ts';
