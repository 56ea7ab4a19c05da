// Benchmark peers: the best-known Node proxies (http-proxy, @fastify/http-proxy), each in its own process, keep-alive to the backend.
// Usage: node --import tsx bench/proxy/node-peer.ts http-proxy|fastify BACKEND_PORT; prints {"port":N} when ready.
import { Agent, createServer } from 'node:http';
import type { AddressInfo } from 'node:net';

const [kind, backendPort] = process.argv.slice(2);
const upstream = `http://127.0.0.1:${backendPort}`;
let port: number;
let close: () => Promise<void>;

if (kind === 'http-proxy') {
  const { default: httpProxy } = await import('http-proxy');
  const proxy = httpProxy.createProxyServer({ target: upstream, agent: new Agent({ keepAlive: true, maxSockets: 256 }), xfwd: true });
  proxy.on('error', (_err, _req, res) => {
    if ('writeHead' in res && !res.headersSent) res.writeHead(502);
    res.end();
  });
  const server = createServer((req, res) => proxy.web(req, res));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  port = (server.address() as AddressInfo).port;
  close = () => new Promise((resolve) => { server.closeAllConnections(); server.close(() => resolve()); });
} else if (kind === 'fastify') {
  const { default: Fastify } = await import('fastify');
  const { default: fastifyProxy } = await import('@fastify/http-proxy');
  const app = Fastify({ logger: false });
  await app.register(fastifyProxy, { upstream });
  await app.listen({ port: 0, host: '127.0.0.1' });
  port = (app.server.address() as AddressInfo).port;
  close = () => app.close();
} else {
  throw new Error(`unknown peer ${kind ?? '(none)'}: http-proxy or fastify`);
}

process.stdout.write(`${JSON.stringify({ port })}\n`);
process.once('SIGTERM', () => { void close().then(() => process.exit(0)); });
