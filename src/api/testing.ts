// Helpers for the API's own tests: APIs over a temp SQLite catalog with two organizations, and typed clients of both.
import type { TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openSqliteCatalog, type Catalog } from '../catalog/index.ts';
import { ApiError, TarmacClient } from '../client/index.ts';
import { hashToken, newToken } from '../shared/ids.ts';
import { silentLogger } from '../shared/log.ts';
import { startApi, type ApiOptions } from './index.ts';

export const adminToken = 'admin-secret-token';

export interface TwoOrgApi {
  catalog: Catalog;
  /** Base URL of the first API. */
  url: string;
  /** The admin token, on the first API. */
  admin: TarmacClient;
  /** The admin token, on a second API over the same catalog. */
  other: TarmacClient;
  /** A token of org `acme` (the admin's org is `personal`), on the first API. */
  acme: TarmacClient;
}

/** Two APIs over one temp SQLite catalog holding orgs `personal` and `acme`; everything is removed after the test. */
export async function twoOrgApi(t: TestContext, more: Partial<ApiOptions> = {}): Promise<TwoOrgApi> {
  const dir = await mkdtemp(join(tmpdir(), 'tarmac-api-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const catalog = openSqliteCatalog(join(dir, 'catalog.db'));
  t.after(() => catalog.close());
  const at = new Date().toISOString();
  await catalog.putOrg({ slug: 'personal', name: 'Personal', network_id: 1, created_at: at });
  await catalog.putOrg({ slug: 'acme', name: 'Acme', network_id: 2, created_at: at });
  const acmeToken = newToken();
  await catalog.putToken({ hash: hashToken(acmeToken), org_slug: 'acme', role: 'org', name: 'acme', created_at: at });
  const opts = { catalog, listen: { host: '127.0.0.1', port: 0 }, log: silentLogger(), region: 'local', adminToken, ...more };
  const api = await startApi(opts);
  t.after(() => api.close());
  const second = await startApi(opts);
  t.after(() => second.close());
  return {
    catalog, url: api.url,
    admin: new TarmacClient({ baseUrl: api.url, token: adminToken }),
    other: new TarmacClient({ baseUrl: second.url, token: adminToken }),
    acme: new TarmacClient({ baseUrl: api.url, token: acmeToken }),
  };
}

/** Asserts that `p` fails with an ApiError of `status` whose message matches. */
export async function rejects(p: Promise<unknown>, status: number, match: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof ApiError, String(e));
    assert.equal(e.status, status, e.message);
    assert.match(e.message, match);
    return true;
  });
}
