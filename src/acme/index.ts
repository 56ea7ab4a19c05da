// The ACME component's public face: the manager that issues and renews certificates, and its renewal decision.
export { AcmeManager, type AcmeManagerOptions, type AcmeChallengeType } from './manager.ts';
export { acmeDue, defaultAcmePolicy, type AcmePolicy } from './due.ts';
export type { AcmeAccountOptions } from './account.ts';
