// Benchmark backend: a `ws` WebSocket server that echoes every message back as it came (text or binary).
// Usage: node --import tsx bench/proxy/ws-echo.ts; prints {"port":N} when ready.
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { WebSocketServer } from 'ws';

const server = createServer((_req, res) => res.end('a WebSocket echo server\n'));
const wss = new WebSocketServer({ server, perMessageDeflate: false });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
});
await new Promise<void>((resolve) => server.listen({ port: 0, host: '127.0.0.1', backlog: 4096 }, resolve));
process.stdout.write(`${JSON.stringify({ port: (server.address() as AddressInfo).port })}\n`);
process.once('SIGTERM', () => {
  for (const c of wss.clients) c.terminate();
  wss.close();
  server.closeAllConnections();
  server.close(() => process.exit(0));
});
