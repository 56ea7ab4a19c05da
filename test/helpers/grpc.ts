// A gRPC echo service for proxy tests: a grpc-js server on loopback (h2c) and a typed client, no .proto needed.
import type { TestContext } from 'node:test';
import * as grpc from '@grpc/grpc-js';

const bytes = (b: Buffer) => b;

/** Echo (unary) and Count (server streaming) with raw bytes as messages. */
export const echoService = {
  echo: {
    path: '/tarmac.test.Echo/Echo', requestStream: false, responseStream: false,
    requestSerialize: bytes, requestDeserialize: bytes, responseSerialize: bytes, responseDeserialize: bytes,
  },
  count: {
    path: '/tarmac.test.Echo/Count', requestStream: false, responseStream: true,
    requestSerialize: bytes, requestDeserialize: bytes, responseSerialize: bytes, responseDeserialize: bytes,
  },
} satisfies grpc.ServiceDefinition;

export interface EchoClient extends grpc.Client {
  echo(req: Buffer, md: grpc.Metadata, cb: (err: grpc.ServiceError | null, res?: Buffer) => void): grpc.ClientUnaryCall;
  count(req: Buffer, md?: grpc.Metadata): grpc.ClientReadableStream<Buffer>;
}

export const EchoClient = grpc.makeGenericClientConstructor(echoService, 'Echo') as unknown as
  new (target: string, creds: grpc.ChannelCredentials, opts: grpc.ChannelOptions) => EchoClient;

/**
 * Starts the echo server on loopback; returns its port. Echo answers `echo(<x-client>):<request>` with trailer
 * `x-echo-trailer: len=N` and fails with NOT_FOUND for "missing"; Count streams N items with trailer `x-count`.
 * `seen` gets every Echo call's request metadata.
 */
export async function grpcBackend(t: TestContext, seen: grpc.Metadata[] = []): Promise<number> {
  const server = new grpc.Server();
  server.addService(echoService, {
    echo: (call: grpc.ServerUnaryCall<Buffer, Buffer>, cb: grpc.sendUnaryData<Buffer>) => {
      seen.push(call.metadata);
      if (call.request.toString() === 'missing') {
        cb({ code: grpc.status.NOT_FOUND, details: 'no such thing' });
        return;
      }
      const trailer = new grpc.Metadata();
      trailer.set('x-echo-trailer', `len=${call.request.length}`);
      const client = call.metadata.get('x-client');
      cb(null, Buffer.concat([Buffer.from(`echo(${String(client[0] ?? '')}):`), call.request]), trailer);
    },
    count: (call: grpc.ServerWritableStream<Buffer, Buffer>) => {
      const n = Number(call.request.toString());
      for (let i = 1; i <= n; i++) call.write(Buffer.from(`item ${i}`));
      const trailer = new grpc.Metadata();
      trailer.set('x-count', String(n));
      call.end(trailer);
    },
  });
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
  });
  t.after(() => new Promise<void>((r) => server.tryShutdown(() => r())));
  return port;
}

/** One Echo call: the reply and the trailing metadata. */
export function echo(client: EchoClient, text: string, md = new grpc.Metadata()): Promise<{ reply: Buffer; trailer: grpc.Metadata }> {
  return new Promise((resolve, reject) => {
    let trailing: grpc.Metadata | undefined;
    const call = client.echo(Buffer.from(text), md, (err, res) => {
      if (err) return reject(err);
      setImmediate(() => resolve({ reply: res!, trailer: trailing ?? new grpc.Metadata() }));
    });
    call.on('status', (s: grpc.StatusObject) => { trailing = s.metadata; });
  });
}
