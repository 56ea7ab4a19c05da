// Benchmark peers: the best-known Node proxies (http-proxy, @fastify/http-proxy) and a bare node:http + undici dispatch()
// proxy (Tarmac's floor: what Node costs without any of Tarmac's own work), each in its own process, keep-alive to the backend.
// Usage: node --import tsx bench/proxy/node-peer.ts http-proxy|fastify|undici|undici2 BACKEND_PORT; prints {"port":N} when ready.
// undici2 is the bare proxy as two node:cluster workers sharing the port (as Tarmac's startProxyCluster runs).
import cluster from 'node:cluster';
import { Agent, createServer } from 'node:http';
import type { AddressInfo } from 'node:net';

const [kind, backendPort] = process.argv.slice(2);
const clustered = kind === 'undici2';
if (clustered && cluster.isPrimary) {
  cluster.setupPrimary({ execArgv: [...process.execArgv] });
  const workers = [cluster.fork(), cluster.fork()];
  const ports = await Promise.all(workers.map((w) => new Promise<number>((resolve) => w.once('message', (m: { port: number }) => resolve(m.port)))));
  process.stdout.write(`${JSON.stringify({ port: ports[0] })}\n`);
  process.once('SIGTERM', () => { for (const w of workers) w.kill(); process.exit(0); });
}
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
} else if (clustered && cluster.isPrimary) {
  port = 0;
  close = async () => undefined;
} else if (kind === 'undici' || kind === 'undici2') {
  // No routing, ids, limits or metrics: hop-by-hop headers stripped, X-Forwarded-For added, bodies streamed both ways.
  const { Pool } = await import('undici');
  const pool = new Pool(upstream, { pipelining: 1, keepAliveTimeout: 4_000 });
  const hop = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade']);
  const server = createServer((req, res) => {
    const raw = req.rawHeaders;
    const headers: string[] = [];
    for (let i = 0; i < raw.length; i += 2) if (!hop.has(raw[i]!.toLowerCase())) headers.push(raw[i]!, raw[i + 1]!);
    headers.push('x-forwarded-for', req.socket.remoteAddress ?? '');
    let resumeBody = () => {};
    const hasBody = req.headers['content-length'] !== undefined || req.headers['transfer-encoding'] !== undefined;
    pool.dispatch({ path: req.url ?? '/', method: req.method ?? 'GET', headers, body: hasBody ? req : null }, {
      onConnect(abort) { res.once('close', () => { if (!res.writableFinished) abort(); }); },
      onHeaders(status, rawHeaders, resume, statusText) {
        resumeBody = resume;
        const out: string[] = [];
        for (let i = 0; i < rawHeaders.length; i += 2) {
          const name = rawHeaders[i]!.toString('latin1');
          if (!hop.has(name.toLowerCase())) out.push(name, rawHeaders[i + 1]!.toString('latin1'));
        }
        res.writeHead(status, statusText, out);
        return true;
      },
      onData(chunk) {
        if (res.write(chunk)) return true;
        res.once('drain', resumeBody);
        return false;
      },
      onComplete() { res.end(); },
      onError() {
        if (!res.headersSent) res.writeHead(502);
        res.end();
      },
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  port = (server.address() as AddressInfo).port;
  close = () => new Promise((resolve) => { server.closeAllConnections(); server.close(() => resolve()); void pool.close(); });
} else {
  throw new Error(`unknown peer ${kind ?? '(none)'}: http-proxy, fastify or undici`);
}

if (!clustered) {
  process.stdout.write(`${JSON.stringify({ port })}\n`);
  process.once('SIGTERM', () => { void close().then(() => process.exit(0)); });
} else if (cluster.isWorker) {
  // Exit normally when the primary stops this worker, so flags such as --cpu-prof can write their output.
  process.once('SIGTERM', () => process.exit(0));
  process.send!({ port });
}
