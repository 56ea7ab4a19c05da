// WebSocket benchmark: message round trip (one connection) and message rate (several) to an echo backend, direct and through nginx, HAProxy and Tarmac's proxy.
import { once } from 'node:events';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { WebSocket } from 'ws';
import { freePort } from '../../test/helpers/registry.ts';
import { nginxCommon, type Peer, startHaproxy, startNginx, startNodeScript, treeCpuSeconds } from './processes.ts';
import { machine, median, percentileOfSorted, watchLoad } from './stats.ts';

export interface WsBenchOptions {
  dir: string;
  rounds: number;
  /** Seconds per message-rate run. */
  seconds: number;
  /** Round trips per latency run. Default 2000. */
  roundTrips?: number;
  /** Connections of the message-rate runs. Default 16. */
  connections?: number;
}

interface Sample { p50: number; p99: number; rate: number; cpuPerMessage: number }

const host = 'bench.localhost';
const payload = Buffer.alloc(32, 'x');

/** nginx passing WebSocket upgrades to the echo backend (Upgrade and Connection set from the client's), one worker per core. */
async function startNginxWs(dir: string, backendPort: number): Promise<Peer> {
  const port = await freePort();
  return startNginx('nginx', dir, 'ws.conf', `${nginxCommon(dir, 'auto')}
http {
  access_log off;
  map $http_upgrade $connection_upgrade { default upgrade; '' close; }
  server {
    listen 127.0.0.1:${port} backlog=4096;
    location / {
      proxy_pass http://127.0.0.1:${backendPort};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 300s;
    }
  }
}
`, port);
}

/** HAProxy in http mode (it passes upgrades and then tunnels), one thread per core. */
function startHaproxyWs(dir: string, backendPort: number): Promise<Peer> {
  return startHaproxy(dir, backendPort, { file: 'haproxy-ws.cfg', defaults: ['timeout tunnel 300s'] });
}

async function open(port: number): Promise<WebSocket> {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/echo`, { headers: { host }, perMessageDeflate: false });
  await Promise.race([once(ws, 'open'), once(ws, 'unexpected-response').then(() => { throw new Error(`upgrade refused on ${port}`); })]);
  return ws;
}

/** Sends `n` small messages over one connection, each after the previous one's echo; returns the round trips in µs, sorted. */
async function roundTrips(port: number, n: number): Promise<Float64Array> {
  const ws = await open(port);
  const times = new Float64Array(n);
  try {
    await new Promise<void>((resolve, reject) => {
      let i = 0;
      let sentAt = 0;
      const send = () => { sentAt = performance.now(); ws.send(payload); };
      ws.on('message', () => {
        times[i++] = (performance.now() - sentAt) * 1000;
        if (i === n) resolve();
        else send();
      });
      ws.once('error', reject);
      ws.once('close', () => reject(new Error(`the connection closed after ${i} of ${n} round trips`)));
      send();
    });
  } finally {
    ws.terminate();
  }
  return times.sort();
}

/** `connections` connections each echoing one message at a time for `seconds`; returns the echoes received per second. */
async function messageRate(port: number, connections: number, seconds: number): Promise<{ messages: number; perSecond: number }> {
  const sockets = await Promise.all(Array.from({ length: connections }, () => open(port)));
  let messages = 0;
  let running = true;
  const t0 = performance.now();
  try {
    await new Promise<void>((resolve, reject) => {
      for (const ws of sockets) {
        ws.on('message', () => {
          messages++;
          if (running) ws.send(payload);
        });
        ws.once('error', reject);
        ws.send(payload);
      }
      setTimeout(() => { running = false; resolve(); }, seconds * 1000);
    });
  } finally {
    for (const ws of sockets) ws.terminate();
  }
  return { messages, perSecond: messages / ((performance.now() - t0) / 1000) };
}

/**
 * Starts a `ws` echo backend, nginx, HAProxy and Tarmac's proxy (one process and a two-worker cluster) in front of
 * it, measures round trips and message rates through each and directly (interleaved rounds), stops them, and
 * returns the markdown section.
 */
export async function benchWebSocket(o: WsBenchOptions): Promise<string> {
  const n = o.roundTrips ?? 2000;
  const connections = o.connections ?? 16;
  const dir = join(o.dir, 'ws');
  await mkdir(dir, { recursive: true });
  const started = new Date();
  const peers: Peer[] = [];
  try {
    const start = async (p: Promise<Peer>) => { const peer = await p; peers.push(peer); return peer; };
    const echo = await start(startNodeScript('direct (ws echo backend)', 'ws-echo.ts', []));
    const targets = [
      echo,
      await start(startNginxWs(dir, echo.port)),
      await start(startHaproxyWs(dir, echo.port)),
      await start(startNodeScript('Tarmac', 'tarmac-proxy.ts', [dir, String(echo.port)])),
      await start(startNodeScript('Tarmac cluster x2', 'tarmac-proxy.ts', [dir, String(echo.port), '2'])),
      await start(startNodeScript('Tarmac, HAProxy engine', 'tarmac-proxy.ts', [dir, String(echo.port), 'haproxy'])),
    ];
    const measure = async (p: Peer, trips: number, secs: number): Promise<Sample> => {
      const times = await roundTrips(p.port, trips);
      const cpu0 = treeCpuSeconds(p.pid);
      const r = await messageRate(p.port, connections, secs);
      // For "direct" the CPU is the backend's own; for proxies, the proxy's (the backend's is the same for all).
      return { p50: percentileOfSorted(times, 50), p99: percentileOfSorted(times, 99), rate: r.perSecond, cpuPerMessage: ((treeCpuSeconds(p.pid) - cpu0) / r.messages) * 1e6 };
    };
    for (const p of targets) await measure(p, 200, 1); // warm-up: JIT, upstream paths; not counted
    const loadOf = watchLoad();
    const samples = new Map<string, Sample[]>();
    for (let round = 0; round < o.rounds; round++) {
      for (let i = 0; i < targets.length; i++) {
        const p = targets[(i + round) % targets.length]!;
        samples.set(p.name, [...(samples.get(p.name) ?? []), await measure(p, n, o.seconds)]);
      }
    }
    const load = loadOf();
    const of = (name: string) => samples.get(name)!;
    const direct = of(echo.name);
    const nginx = of(targets[1]!.name);
    const rows = targets.map((p) => {
      const s = of(p.name);
      const p50 = median(s.map((x) => x.p50));
      const added = p === echo ? '–' : (p50 - median(direct.map((x) => x.p50))).toFixed(0);
      const rates = s.map((x) => x.rate);
      const toDirect = median(s.map((x, i) => x.rate / direct[i]!.rate));
      const toNginx = median(s.map((x, i) => x.rate / nginx[i]!.rate));
      return `| ${p.name} | ${p50.toFixed(0)} | ${median(s.map((x) => x.p99)).toFixed(0)} | ${added} | ${median(rates).toFixed(0)} | ${Math.min(...rates).toFixed(0)}–${Math.max(...rates).toFixed(0)} | ${toDirect.toFixed(2)} | ${toNginx.toFixed(2)} | ${median(s.map((x) => x.cpuPerMessage)).toFixed(1)} |`;
    });
    return `
## WebSocket message round trip

Run ${started.toISOString()} on: ${machine()}. ${load}

Method: a \`ws\` echo server (one Node process, no compression) on loopback is the backend; nginx (\`Upgrade\`/\`Connection\`
passed on, one worker per core), HAProxy (http mode, one thread per core) and Tarmac's proxy (one process, and two
\`node:cluster\` workers; routed by Host from its catalog like every other request) stand in front of it. The client is
the \`ws\` library in the benchmark's process. Round trip: one connection sends a ${payload.length}-byte text message and
waits for its echo, ${n} times; p50/p99 over those. Message rate: ${connections} connections, each sending its next message
when the previous one's echo arrives, for ${o.seconds} s. After a warm-up of every target, ${o.rounds} rounds, interleaved with the
order rotated each round; figures are medians over rounds, ratios the median of each round's ratio. CPU µs/message is the
target's process-tree CPU during the rate run over echoes (for "direct", the backend's own; through a proxy, the
proxy's, which relays each message twice: there and back). Client, proxy and backend share the two cores.

| target | round trip p50 µs | p99 µs | added p50 µs | messages/s (${connections} conns) | range | ratio to direct | ratio to nginx | CPU µs/message |
|---|---|---|---|---|---|---|---|---|
${rows.join('\n')}

The message rate is bounded by the Node client and echo backend on the same cores ("direct" is the ceiling), so it
shows how much of that ceiling each proxy takes away, not the proxy's own limit; CPU µs/message compares the proxies
themselves. Once upgraded, Tarmac's proxy only relays between the two sockets (\`socket.pipe\` both ways, routing was
done once at the upgrade): each message costs a read and a write per direction through libuv and Node's streams in
JavaScript, where nginx and HAProxy relay in C.
`;
  } finally {
    for (const p of peers.reverse()) await p.stop();
  }
}
