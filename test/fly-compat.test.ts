// A client written only from Fly.io's Machines API v1 documentation (raw fetch, documented shapes and headers) against a real host.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { request as httpRequest } from 'node:http';
import { startRegistry, type TestRegistry } from './helpers/registry.ts';
import { buildAndPushImage, httpImageCommand } from './helpers/images.ts';
import { startTestHost, machineNamespaces, type TestHost } from './helpers/host.ts';
import { waitFor } from './helpers/wait.ts';

// ---- the documentation's client: FLY_API_HOSTNAME + FLY_API_TOKEN, JSON in and out ----

interface Answer {
  status: number;
  contentType: string;
  // What the documentation says comes back: JSON, read loosely on purpose.
  body: any;
}

interface CallOptions {
  body?: unknown;
  /** Sent as is, for malformed-JSON checks. */
  rawBody?: string;
  /** null: no Authorization header. */
  token?: string | null;
  headers?: Record<string, string>;
}

function flyApi(baseUrl: string, token: string) {
  return async (method: string, path: string, opts: CallOptions = {}): Promise<Answer> => {
    const headers: Record<string, string> = { 'Content-Type': 'application/json', ...opts.headers };
    const tok = opts.token === undefined ? token : opts.token;
    if (tok !== null) headers['Authorization'] = `Bearer ${tok}`;
    const init: RequestInit = { method, headers };
    if (opts.rawBody !== undefined) init.body = opts.rawBody;
    else if (opts.body !== undefined) init.body = JSON.stringify(opts.body);
    const res = await fetch(`${baseUrl}${path}`, init);
    const text = await res.text();
    let body: unknown;
    try {
      body = text === '' ? undefined : JSON.parse(text);
    } catch {
      body = text;
    }
    return { status: res.status, contentType: res.headers.get('content-type') ?? '', body };
  };
}

/** A 4xx answer in the documented error shape: JSON `{"error": "…"}`. */
function assertError(a: Answer, status: number, message?: RegExp): void {
  assert.equal(a.status, status, `expected ${status}, got ${a.status}: ${JSON.stringify(a.body)}`);
  assert.match(a.contentType, /^application\/json/);
  assert.equal(typeof a.body?.error, 'string', `error body ${JSON.stringify(a.body)}`);
  assert.ok(a.body.error.length > 0);
  if (message) assert.match(a.body.error, message);
}

/** GET through the proxy with the app's Host header. */
function viaProxy(proxyUrl: string, app: string, path = '/'): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest(`${proxyUrl}${path}`, { headers: { host: `${app}.localhost` } }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (d: string) => { body += d; }).on('end', () => resolve({ status: res.statusCode ?? 0, body: body.trim() }));
    });
    req.on('error', reject);
    req.end();
  });
}

const isoDate = (v: unknown): boolean => typeof v === 'string' && !Number.isNaN(Date.parse(v));

describe('a client written from Fly.io Machines API documentation', () => {
  let registry: TestRegistry;
  let h: TestHost;
  let image: string;
  let api: ReturnType<typeof flyApi>;
  /** Ids of the machines this file started, for the leak check (other tests may run machines meanwhile). */
  const started: string[] = [];

  before(async () => {
    registry = await startRegistry();
    // The http test image (hostname at /, busybox httpd on :8080) plus a CGI script that shows an env var.
    image = await buildAndPushImage(registry.host, 'fly-compat', {
      files: {
        'var/www/cgi-bin/env': [
          '#!/bin/sh',
          'printf "Content-Type: text/plain\\r\\n\\r\\n"',
          'echo "machine_id=$FLY_MACHINE_ID"',
          'echo "greeting=$GREETING"',
          '',
        ].join('\n'),
      },
      cmd: ['sh', '-c', httpImageCommand],
      env: ['PATH=/bin'],
    });
    h = await startTestHost();
    api = flyApi(h.host.apiUrl!, h.host.adminToken);
  });
  after(async () => {
    await h?.close();
    await registry?.stop();
    const left = await machineNamespaces();
    assert.deepEqual(started.filter((id) => left.includes(id.slice(0, 12))), [], 'no machine network namespace is left');
  });

  // autostart off (Fly's default is on): the test stops every machine and expects the proxy to serve nothing.
  const service = { protocol: 'tcp', internal_port: 8080, ports: [{ port: 80, handlers: ['http'] }], autostart: false };

  test('create an app and three machines, wait for started, serve through the proxy, update, stop, destroy', async () => {
    // Apps: create (201, {id, created_at: unix ms}), get, list.
    const created = await api('POST', '/v1/apps', { body: { app_name: 'flyc', org_slug: 'personal' } });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    assert.equal(typeof created.body.id, 'string');
    assert.equal(typeof created.body.created_at, 'number');
    assert.ok(Math.abs(created.body.created_at - Date.now()) < 600_000, 'created_at is unix milliseconds');
    const app = await api('GET', '/v1/apps/flyc');
    assert.equal(app.status, 200);
    assert.equal(app.body.name, 'flyc');
    assert.deepEqual(app.body.organization, { name: app.body.organization.name, slug: 'personal' });
    assert.equal(typeof app.body.status, 'string');
    const apps = await api('GET', '/v1/apps?org_slug=personal');
    assert.equal(apps.status, 200);
    assert.equal(typeof apps.body.total_apps, 'number');
    const listed = apps.body.apps.find((a: { name: string }) => a.name === 'flyc');
    assert.equal(typeof listed.id, 'string');
    assert.equal(listed.machine_count, 0);
    assert.equal(listed.network, 'default');

    // Machines: three from the image, with a service on port 80 (http handler) to internal port 8080.
    const config = { image, services: [service] };
    const made: Answer[] = await Promise.all([1, 2, 3].map(() => api('POST', '/v1/apps/flyc/machines', { body: { config } })));
    for (const m of made) {
      assert.equal(m.status, 200, JSON.stringify(m.body));
      assert.match(m.body.id, /^[0-9a-f]{14}$/);
      assert.equal(typeof m.body.name, 'string');
      assert.equal(m.body.state, 'created');
      assert.equal(typeof m.body.instance_id, 'string');
      assert.deepEqual(m.body.config, config);
    }
    const ids: string[] = made.map((m) => m.body.id);
    started.push(...ids);
    const instances = new Map<string, string>(made.map((m) => [m.body.id, m.body.instance_id]));

    // Wait, as documented: state, instance_id and timeout in seconds; 200 {"ok": true}.
    await Promise.all(ids.map(async (id) => {
      const w = await api('GET', `/v1/apps/flyc/machines/${id}/wait?state=started&instance_id=${instances.get(id)}&timeout=60`);
      assert.equal(w.status, 200, JSON.stringify(w.body));
      assert.deepEqual(w.body, { ok: true });
    }));

    // All three answer through the proxy (each serves its hostname, which is its id).
    const seen = new Set<string>();
    await waitFor('all three machines to answer through the proxy', async () => {
      const r = await viaProxy(h.proxyUrl, 'flyc');
      if (r.status === 200) seen.add(r.body);
      return seen.size === 3;
    }, 60_000);
    assert.deepEqual([...seen].sort(), [...ids].sort());

    // List and get: the documented machine fields, with their types.
    const list = await api('GET', '/v1/apps/flyc/machines');
    assert.equal(list.status, 200);
    assert.ok(Array.isArray(list.body));
    assert.deepEqual(list.body.map((m: { id: string }) => m.id).sort(), [...ids].sort());
    assert.ok(list.body.every((m: { state: string }) => m.state === 'started'));
    const one = await api('GET', `/v1/apps/flyc/machines/${ids[0]}`);
    assert.equal(one.status, 200);
    const m = one.body;
    assert.equal(m.id, ids[0]);
    assert.equal(typeof m.name, 'string');
    assert.equal(m.state, 'started');
    assert.equal(typeof m.region, 'string');
    assert.equal(m.instance_id, instances.get(ids[0]!));
    assert.match(m.private_ip, /^fdaa:/);
    assert.deepEqual(m.config, config);
    assert.equal(m.image_ref.registry, registry.host);
    assert.equal(m.image_ref.repository, 'fly-compat');
    assert.equal(m.image_ref.tag, 'latest');
    assert.match(m.image_ref.digest, /^sha256:[0-9a-f]{64}$/);
    assert.equal(typeof m.image_ref.labels, 'object');
    assert.ok(isoDate(m.created_at) && isoDate(m.updated_at), 'created_at and updated_at are dates');
    assert.ok(Array.isArray(m.events) && m.events.length > 0);
    for (const e of m.events) {
      assert.equal(typeof e.type, 'string');
      assert.equal(typeof e.status, 'string');
      assert.ok(e.source === 'user' || e.source === 'flyd', `event source ${e.source}`);
      assert.equal(typeof e.timestamp, 'number');
    }
    assert.ok(m.events.some((e: { type: string; status: string }) => e.type === 'start' && e.status === 'started'));
    if (m.version !== undefined) assert.equal(typeof m.version, 'string', 'fly-go reads version as a string');
    if (m.nonce !== undefined) assert.fail('an unleased machine shows no nonce');

    // Update: the whole config with a changed env; a new instance_id, and the running machine sees it.
    const upd = await api('POST', `/v1/apps/flyc/machines/${ids[0]}`, { body: { config: { ...m.config, env: { GREETING: 'hello from the docs' } } } });
    assert.equal(upd.status, 200, JSON.stringify(upd.body));
    assert.notEqual(upd.body.instance_id, m.instance_id);
    assert.equal(upd.body.config.env.GREETING, 'hello from the docs');
    instances.set(ids[0]!, upd.body.instance_id);
    const w = await api('GET', `/v1/apps/flyc/machines/${ids[0]}/wait?state=started&instance_id=${upd.body.instance_id}&timeout=60`);
    assert.equal(w.status, 200, JSON.stringify(w.body));
    await waitFor('the updated machine to serve its new env', async () => {
      const r = await viaProxy(h.proxyUrl, 'flyc', '/cgi-bin/env');
      return r.status === 200 && r.body.includes(`machine_id=${ids[0]}`) && r.body.includes('greeting=hello from the docs');
    }, 60_000);
    const events = await api('GET', `/v1/apps/flyc/machines/${ids[0]}/events`);
    assert.equal(events.status, 200);
    assert.ok(events.body.some((e: { type: string }) => e.type === 'update'));
    assert.ok(events.body.some((e: { type: string; status: string; source: string }) => e.type === 'launch' && e.status === 'created' && e.source === 'user'));

    // Stop all three (body as documented), wait for stopped with instance_id.
    for (const [i, id] of ids.entries()) {
      const body = i === 0 ? { signal: 'SIGTERM', timeout: '10s' } : {};
      const s = await api('POST', `/v1/apps/flyc/machines/${id}/stop`, { body });
      assert.equal(s.status, 200, JSON.stringify(s.body));
      assert.deepEqual(s.body, { ok: true });
    }
    for (const id of ids) {
      const ws = await api('GET', `/v1/apps/flyc/machines/${id}/wait?state=stopped&instance_id=${instances.get(id)}&timeout=60`);
      assert.equal(ws.status, 200, JSON.stringify(ws.body));
    }
    await waitFor('the proxy to answer 5xx with no started machine', async () => (await viaProxy(h.proxyUrl, 'flyc')).status >= 502);

    // Start one again (documented answer), then destroy: stopped ones plainly, the started one with force=true.
    const st = await api('POST', `/v1/apps/flyc/machines/${ids[2]}/start`);
    assert.equal(st.status, 200, JSON.stringify(st.body));
    assert.equal(st.body.previous_state, 'stopped');
    assert.equal(typeof st.body.migrated, 'boolean');
    assert.equal(typeof st.body.new_host, 'string');
    assert.equal((await api('GET', `/v1/apps/flyc/machines/${ids[2]}/wait?state=started&timeout=60`)).status, 200);
    assertError(await api('DELETE', `/v1/apps/flyc/machines/${ids[2]}`), 412, /force/);
    for (const [id, query] of [[ids[0], ''], [ids[1], ''], [ids[2], '?force=true']] as const) {
      const d = await api('DELETE', `/v1/apps/flyc/machines/${id}${query}`);
      assert.equal(d.status, 200, JSON.stringify(d.body));
      assert.deepEqual(d.body, { ok: true });
    }
    for (const id of ids) {
      const wd = await api('GET', `/v1/apps/flyc/machines/${id}/wait?state=destroyed&timeout=60`);
      assert.equal(wd.status, 200, JSON.stringify(wd.body));
    }
    assert.deepEqual((await api('GET', '/v1/apps/flyc/machines')).body, []);
    const deleted = await api('GET', '/v1/apps/flyc/machines?include_deleted=true');
    assert.deepEqual(deleted.body.map((x: { state: string }) => x.state), ['destroyed', 'destroyed', 'destroyed']);

    // Delete the app: 202, and it is gone.
    const del = await api('DELETE', '/v1/apps/flyc');
    assert.equal(del.status, 202);
    assertError(await api('GET', '/v1/apps/flyc'), 404);
  });

  test('bad input, unknown things, auth and leases answer 4xx with JSON errors', async () => {
    assert.equal((await api('POST', '/v1/apps', { body: { app_name: 'flyerr', org_slug: 'personal' } })).status, 201);
    const post = (body: unknown) => api('POST', '/v1/apps/flyerr/machines', { body });

    // Malformed JSON, wrong types, unknown fields, missing config.image: 400 naming the field.
    assertError(await api('POST', '/v1/apps/flyerr/machines', { rawBody: '{"config": {"image": ' }), 400, /JSON/);
    assertError(await api('POST', '/v1/apps', { rawBody: '{"app_name": ' }), 400, /JSON/);
    assertError(await post({ config: { image: 42 } }), 400, /config\.image/);
    assertError(await post({ config: { image, guest: { cpus: 'two' } } }), 400, /config\.guest\.cpus/);
    assertError(await post({ config: { image }, skip_launch: 'yes' }), 400, /skip_launch/);
    assertError(await post({ config: { image }, colour: 'red' }), 400, /colour/);
    assertError(await post({ config: { image, bogus: true } }), 400, /config\.bogus/);
    assertError(await post({ config: {} }), 400, /config\.image/);
    assertError(await post({ name: 'x' }), 400, /config/);
    assertError(await api('POST', '/v1/apps', { body: { app_name: 'flyerr2', org_slug: 'personal', colour: 'red' } }), 400, /colour/);
    assertError(await api('POST', '/v1/apps', { body: { org_slug: 'personal' } }), 400, /app_name/);
    assert.deepEqual((await api('GET', '/v1/apps/flyerr/machines')).body, [], 'rejected requests leave nothing behind');

    // Unknown app or machine: 404; a taken app name: 409.
    assertError(await api('GET', '/v1/apps/no-such-app'), 404);
    assertError(await api('POST', '/v1/apps/no-such-app/machines', { body: { config: { image } } }), 404);
    assertError(await api('GET', '/v1/apps/flyerr/machines/ffffffffffffff'), 404);
    assertError(await api('POST', '/v1/apps/flyerr/machines/ffffffffffffff/stop', { body: {} }), 404);
    const taken = await api('POST', '/v1/apps', { body: { app_name: 'flyerr', org_slug: 'personal' } });
    assertError(taken, 409);

    // No token, a wrong token: 401.
    assertError(await api('GET', '/v1/apps?org_slug=personal', { token: null }), 401);
    assertError(await api('GET', '/v1/apps?org_slug=personal', { token: 'not-a-token' }), 401);
    assertError(await api('POST', '/v1/apps/flyerr/machines', { token: 'not-a-token', body: { config: { image } } }), 401);

    // Fields of Fly's schema that Tarmac does not act on are accepted and kept.
    const kept = { image, dns: { skip_registration: true }, files: [{ guest_path: '/x', raw_value: 'eA==' }], init: {}, services: [{ ...service, force_instance_key: null }] };
    const leased = await post({ config: kept, skip_launch: true, skip_service_registration: true, skip_secrets: false, lsvd: false });
    assert.equal(leased.status, 200, JSON.stringify(leased.body));
    assert.deepEqual(leased.body.config, kept);
    assert.equal(leased.body.cordoned, true, 'skip_service_registration creates the machine cordoned');
    const id: string = leased.body.id;
    const path = `/v1/apps/flyerr/machines/${id}`;

    // A wait that runs out: 408 with a JSON error.
    assertError(await api('GET', `${path}/wait?state=started&timeout=1`), 408);

    // Leases: acquire (201, documented shape), a second acquire conflicts, changes need the nonce header.
    assertError(await api('GET', `${path}/lease`), 404);
    const lease = await api('POST', `${path}/lease`, { body: { ttl: 60 } });
    assert.equal(lease.status, 201, JSON.stringify(lease.body));
    assert.equal(lease.body.status, 'success');
    assert.equal(typeof lease.body.data.nonce, 'string');
    assert.equal(typeof lease.body.data.expires_at, 'number');
    assert.ok(lease.body.data.expires_at > Date.now() / 1000 + 30, 'expires_at is unix seconds');
    assert.equal(typeof lease.body.data.owner, 'string');
    assert.equal(typeof lease.body.data.version, 'string');
    const nonce: string = lease.body.data.nonce;
    assertError(await api('POST', `${path}/lease`, { body: { ttl: 60 } }), 409);
    assertError(await api('POST', path, { body: { config: kept, skip_launch: true } }), 409, /fly-machine-lease-nonce/);
    assertError(await api('POST', path, { body: { config: kept, skip_launch: true }, headers: { 'fly-machine-lease-nonce': 'wrong' } }), 409);
    const withNonce = await api('POST', path, { body: { config: kept, skip_launch: true }, headers: { 'fly-machine-lease-nonce': nonce } });
    assert.equal(withNonce.status, 200, JSON.stringify(withNonce.body));
    const got = await api('GET', `${path}/lease`);
    assert.equal(got.status, 200);
    assert.equal(got.body.data.nonce, nonce);
    assert.equal((await api('GET', path)).body.nonce, nonce, 'a leased machine shows its nonce');
    assertError(await api('DELETE', `${path}/lease`), 400, /fly-machine-lease-nonce/);
    const released = await api('DELETE', `${path}/lease`, { headers: { 'fly-machine-lease-nonce': nonce } });
    assert.equal(released.status, 200);
    assert.deepEqual(released.body, { status: 'success', data: { ok: true } });
    assertError(await api('GET', `${path}/lease`), 404);

    // Metadata, as documented: set (204), get, filter the list by it, delete (204).
    const set = await api('POST', `${path}/metadata/role`, { body: { value: 'worker' } });
    assert.equal(set.status, 204);
    assert.deepEqual((await api('GET', `${path}/metadata`)).body, { role: 'worker' });
    assert.deepEqual((await api('GET', '/v1/apps/flyerr/machines?metadata.role=worker')).body.map((x: { id: string }) => x.id), [id]);
    assert.equal((await api('DELETE', `${path}/metadata/role`)).status, 204);
    assert.deepEqual((await api('GET', `${path}/metadata`)).body, {});

    assert.equal((await api('DELETE', '/v1/apps/flyerr')).status, 202);
  });

  test('what the fly-go client sends is understood', async () => {
    // flaps.CreateApp: `name` rather than `app_name`, Go zero values for what it leaves unset.
    const app = await api('POST', '/v1/apps?wait=true', { body: { name: 'flygo', org_slug: 'personal', network: '', app_role_id: '' } });
    assert.equal(app.status, 201, JSON.stringify(app.body));
    const m = await api('POST', '/v1/apps/flygo/machines', { body: { config: { image, init: {} }, skip_launch: true, skip_secrets: false } });
    assert.equal(m.status, 200, JSON.stringify(m.body));
    const path = `/v1/apps/flygo/machines/${m.body.id}`;
    // flaps.AcquireLease: the ttl in the query and no body.
    const lease = await api('POST', `${path}/lease?ttl=30`);
    assert.equal(lease.status, 201, JSON.stringify(lease.body));
    const nonce: string = lease.body.data.nonce;
    assert.ok(lease.body.data.expires_at <= Date.now() / 1000 + 31);
    // flaps.Stop: StopMachineInput carries the id, an empty signal and a zero timeout.
    const stop = await api('POST', `${path}/stop`, { body: { id: m.body.id, signal: '', timeout: '0s' }, headers: { 'fly-machine-lease-nonce': nonce } });
    assert.equal(stop.status, 200, JSON.stringify(stop.body));
    assertError(await api('POST', `${path}/stop`, { body: { id: 'ffffffffffffff' }, headers: { 'fly-machine-lease-nonce': nonce } }), 400, /^id: /);
    // flaps.Wait: `version` for the instance, `state` repeated.
    const w = await api('GET', `${path}/wait?version=${m.body.instance_id}&timeout=30&state=stopped&state=failed`);
    assert.equal(w.status, 200, JSON.stringify(w.body));
    // flyctl's `machine wait` default: settled.
    assert.equal((await api('GET', `${path}/wait?state=settled&timeout=30`)).status, 200);
    // flaps.Destroy: ?kill=
    assert.equal((await api('DELETE', `${path}?kill=false`, { headers: { 'fly-machine-lease-nonce': nonce } })).status, 200);
    // A taken name carries Fly's machine-readable status, which fly-go's IsNameTakenError reads.
    const taken = await api('POST', '/v1/apps', { body: { name: 'flygo', org_slug: 'personal' } });
    assertError(taken, 409);
    assert.equal(taken.body.status, 'name_taken');
    assert.equal((await api('DELETE', '/v1/apps/flygo')).status, 202);
  });
});
