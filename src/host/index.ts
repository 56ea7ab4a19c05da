// The host's public face: start a host from config, or run `tarmac host`.
export { startHost, type RunningHost } from './host.ts';
export { parseHostConfig, hostConfigSchema, type HostConfig, type HostConfigInput } from './config.ts';
export { runHost, hostUsage } from './main.ts';
