// Where the CLI finds the API: URL and token from flags, then the environment, then the local data dir.
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { TarmacError } from '../shared/errors.ts';
import type { GlobalOptions } from './args.ts';

export const defaultApiUrl = 'http://127.0.0.1:4280';

export interface ApiConfig {
  url: string;
  token: string;
}

type Env = Readonly<Record<string, string | undefined>>;

/** The data directory a local host uses: `$TARMAC_DATA_DIR`, else `./.tarmac` under `cwd`. */
export function dataDir(env: Env, cwd: string): string {
  return resolve(cwd, env['TARMAC_DATA_DIR'] || '.tarmac');
}

/** Resolves URL and token: flags, then TARMAC_API_URL / TARMAC_API_TOKEN, then defaults and `<data dir>/admin-token`. */
export function resolveApiConfig(global: GlobalOptions, env: Env, cwd: string): ApiConfig {
  const url = global.apiUrl ?? (env['TARMAC_API_URL'] || defaultApiUrl);
  let token = global.token ?? (env['TARMAC_API_TOKEN'] || undefined);
  if (token === undefined) {
    const file = join(dataDir(env, cwd), 'admin-token');
    try {
      token = readFileSync(file, 'utf8').trim() || undefined;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') {
        throw new TarmacError('unauthorized', `cannot read the API token from ${file}: ${(e as Error).message}`, { cause: e });
      }
    }
    if (token === undefined) {
      throw new TarmacError('unauthorized', `no API token: pass --token or set TARMAC_API_TOKEN (a host started with \`npm start\` writes one to ${file})`);
    }
  }
  return { url, token };
}
