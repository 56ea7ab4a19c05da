// The orchestrator's public face: the machine reconciler, its drivers, images, networking and logs.
export { Orchestrator, runtimeMetadataKey, type OrchestratorOptions, type ImagePuller } from './orchestrator.ts';
export type { Driver, RunSpec, RunningMachine, ExitStatus, ImageConfig } from './driver.ts';
export { createDriver } from './drivers/index.ts';
export { ImageStore, type ImageProgress, type PulledImage } from './images/index.ts';
export { setupMachineNetwork, teardownMachineNetwork, listMachineNetworks, ensureHostFirewall, FIREWALL_TABLE, NETWORKS_SET } from './network.ts';
export { readLogs, parseLogLine, type LogLine } from './logs.ts';
