// The CLI's public face: `main` for bin/tarmac.mjs, and the pure parsers other tools may reuse.
export { main, runCli } from './main.ts';
export {
  parseCommandLine, parsePortSpec, portsToServices, parseEnvPairs, splitCommand, buildCreateRequest, UsageError,
  type Command, type GlobalOptions, type ParseResult,
} from './args.ts';
export { resolveApiConfig, defaultApiUrl, type ApiConfig } from './config.ts';
export type { Io } from './commands.ts';
