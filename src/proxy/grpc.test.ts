// gRPC end to end: a @grpc/grpc-js client over TLS (h2) to the proxy, h2c to a grpc-js server registered as a machine.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import * as grpc from '@grpc/grpc-js';
import { certificateFromPem, isCertificateProblem, type MachineConfig } from '../catalog/index.ts';
import { testCa, testCert } from '../../test/helpers/certs.ts';
import { createApp, proxyFor, startedMachine, tempCatalog } from './testing.ts';
import { echo, EchoClient, grpcBackend } from '../../test/helpers/grpc.ts';

test('gRPC works end to end through the TLS listener to an h2c machine: unary, server streaming, trailers and status', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'rpc');
  const grpcPort = await grpcBackend(t);
  const services: NonNullable<MachineConfig['services']> = [{
    protocol: 'tcp', internal_port: grpcPort,
    ports: [{ port: 80, handlers: ['http'], http_options: { h2_backend: true } }, { port: 443, handlers: ['tls', 'http'], http_options: { h2_backend: true } }],
  }];
  await startedMachine(catalog, 'rpc', services);
  const ca = await testCa();
  const leaf = await testCert(['grpc.example.com'], { ca });
  const row = certificateFromPem({ hostname: 'grpc.example.com', app: 'rpc', source: 'custom', fullchain: leaf.fullchain, private_key: leaf.key });
  assert.ok(!isCertificateProblem(row));
  await catalog.putCertificate(row);
  const proxy = await proxyFor(t, catalog, {}, {}, { https: { host: '127.0.0.1', port: 0 } });

  const client = new EchoClient(`127.0.0.1:${proxy.httpsAddress!.port}`, grpc.credentials.createSsl(Buffer.from(ca.cert)), {
    'grpc.ssl_target_name_override': 'grpc.example.com', 'grpc.default_authority': 'grpc.example.com',
  });
  t.after(() => client.close());

  // Unary, with request metadata in and trailing metadata out.
  const md = new grpc.Metadata();
  md.set('x-client', 'test');
  const { reply, trailer } = await echo(client, 'hello', md);
  assert.equal(reply.toString(), 'echo(test):hello');
  assert.deepEqual(trailer.get('x-echo-trailer'), ['len=5'], 'trailers arrive intact');

  // A failing call: grpc-status and grpc-message reach the client.
  const failure = await new Promise<grpc.ServiceError>((resolve) => {
    client.echo(Buffer.from('missing'), new grpc.Metadata(), (err) => resolve(err!));
  });
  assert.equal(failure.code, grpc.status.NOT_FOUND);
  assert.equal(failure.details, 'no such thing');

  // Server streaming.
  const stream = client.count(Buffer.from('50'));
  const items: string[] = [];
  const status = await new Promise<grpc.StatusObject>((resolve, reject) => {
    stream.on('data', (b: Buffer) => items.push(b.toString()));
    stream.on('status', resolve);
    stream.on('error', reject);
  });
  assert.equal(status.code, grpc.status.OK);
  assert.equal(items.length, 50);
  assert.equal(items[49], 'item 50');
  assert.deepEqual(status.metadata.get('x-count'), ['50']);

  // Several calls at once share one h2c session to the machine.
  const many = await Promise.all(Array.from({ length: 20 }, (_, i) => new Promise<string>((resolve, reject) => {
    client.echo(Buffer.from(String(i)), new grpc.Metadata(), (err, res) => (err ? reject(err) : resolve(res!.toString())));
  })));
  assert.deepEqual(many, Array.from({ length: 20 }, (_, i) => `echo():${i}`));
});

test('a request HTTP/2 cannot carry (two User-Agent fields) to an h2c machine is a 400, HTTP2-Settings is dropped, and the proxy serves on', async (t) => {
  const catalog = await tempCatalog(t);
  await createApp(catalog, 'rpc');
  const grpcPort = await grpcBackend(t);
  await startedMachine(catalog, 'rpc', [{
    protocol: 'tcp', internal_port: grpcPort, ports: [{ port: 80, handlers: ['http'], http_options: { h2_backend: true } }],
  }]);
  const proxy = await proxyFor(t, catalog);
  const raw = (head: string) => new Promise<string>((resolve, reject) => {
    const s = connect(proxy.address.port, '127.0.0.1', () => s.write(`GET / HTTP/1.1\r\nhost: rpc.localhost\r\nconnection: close\r\n${head}\r\n`));
    let got = '';
    s.setEncoding('latin1').on('data', (d: string) => { got += d; }).on('end', () => resolve(got)).on('error', reject);
  });
  assert.match(await raw('user-agent: a\r\nuser-agent: b\r\n'), /^HTTP\/1\.1 400 /);
  // HTTP2-Settings is connection-specific: dropped, the request goes through (grpc-js answers a plain GET itself).
  assert.doesNotMatch(await raw('http2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n'), /tarmac-proxy-error: bad_request/);
  // The proxy runs in this process: reaching this line means the refused request crashed nothing; it still serves.
  assert.match(await raw(''), /^HTTP\/1\.1 \d{3} /);
});
