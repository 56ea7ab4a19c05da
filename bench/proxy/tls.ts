// TLS handshakes per second (new sessions only) through nginx, HAProxy and Tarmac's proxy with one certificate, driven by `openssl s_time -new`.
import { execFile } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { generateSelfSigned } from '../../src/proxy/certificates.ts';
import { type Peer, startHaproxyTls, startNginxTls, startNodeScript, treeCpuSeconds } from './processes.ts';
import { median } from './stats.ts';

export interface TlsBenchOptions {
  dir: string;
  /** The HTTP backend Tarmac's bench app points at (unused by handshakes, needed for its catalog). */
  backendPort: number;
  rounds: number;
  seconds: number;
  /** Parallel `openssl s_time` clients per run. Default 2 (one per core). */
  clients?: number;
}

interface Sample { handshakes: number; perSecond: number; cpuSeconds: number }

/** One `openssl s_time -new` run: full handshakes completed and the wall seconds they took. */
function sTime(port: number, seconds: number): Promise<{ connections: number; seconds: number }> {
  return new Promise((resolve, reject) => {
    execFile('openssl', ['s_time', '-connect', `127.0.0.1:${port}`, '-new', '-time', String(seconds)], { timeout: (seconds + 30) * 1000 }, (err, stdout) => {
      // "1234 connections in 5 real seconds, 0 bytes read per connection"
      const m = /(\d+) connections in (\d+(?:\.\d+)?) real seconds/.exec(stdout);
      if (m === null) return reject(new Error(`openssl s_time gave no result: ${err?.message ?? stdout.slice(0, 300)}`));
      resolve({ connections: Number(m[1]), seconds: Number(m[2]) });
    });
  });
}

/**
 * Starts nginx, HAProxy and Tarmac's proxy (one process and a two-worker cluster) terminating TLS with the same ECDSA
 * P-256 certificate, measures new handshakes per second against each (interleaved rounds), stops them, and returns
 * the markdown section.
 */
export async function benchTls(o: TlsBenchOptions): Promise<string> {
  const clients = o.clients ?? 2;
  const dir = join(o.dir, 'tls');
  const tarmacCerts = join(dir, 'tarmac');
  await mkdir(tarmacCerts, { recursive: true });
  const pem = await generateSelfSigned(['*.localhost', 'localhost', 'bench.localhost']);
  const cert = join(dir, 'cert.pem');
  const key = join(dir, 'key.pem');
  await writeFile(cert, pem.cert);
  await writeFile(key, pem.key, { mode: 0o600 });
  await writeFile(join(dir, 'combined.pem'), pem.cert + pem.key, { mode: 0o600 });
  // Tarmac's default (no SNI: s_time sends none) is its `*.localhost` certificate in its data dir: make it this one.
  await writeFile(join(tarmacCerts, '_wildcard.localhost.pem'), pem.cert + pem.key, { mode: 0o600 });

  const peers: Peer[] = [];
  try {
    const start = async (p: Promise<Peer>) => { const peer = await p; peers.push(peer); return peer; };
    const targets = [
      await start(startNginxTls(dir, cert, key)),
      await start(startHaproxyTls(dir, join(dir, 'combined.pem'))),
      await start(startNodeScript('Tarmac', 'tarmac-proxy.ts', [dir, String(o.backendPort), '1', tarmacCerts])),
      await start(startNodeScript('Tarmac cluster x2', 'tarmac-proxy.ts', [dir, String(o.backendPort), '2', tarmacCerts])),
    ];
    const once = async (p: Peer, seconds: number): Promise<Sample> => {
      const cpu0 = treeCpuSeconds(p.pid);
      const runs = await Promise.all(Array.from({ length: clients }, () => sTime(p.port, seconds)));
      const handshakes = runs.reduce((n, r) => n + r.connections, 0);
      return { handshakes, perSecond: runs.reduce((n, r) => n + r.connections / r.seconds, 0), cpuSeconds: treeCpuSeconds(p.pid) - cpu0 };
    };
    for (const p of targets) {
      const w = await once(p, 1);
      if (w.handshakes === 0) throw new Error(`${p.name} completed no TLS handshake in the warm-up`);
    }
    const samples = new Map<string, Sample[]>();
    for (let round = 0; round < o.rounds; round++) {
      for (let i = 0; i < targets.length; i++) {
        const p = targets[(i + round) % targets.length]!;
        samples.set(p.name, [...(samples.get(p.name) ?? []), await once(p, o.seconds)]);
      }
    }
    const nginx = samples.get(targets[0]!.name)!;
    const rows = targets.map((p) => {
      const s = samples.get(p.name)!;
      const perSecond = median(s.map((x) => x.perSecond));
      const ratio = median(s.map((x, i) => x.perSecond / nginx[i]!.perSecond));
      const cpu = (s.reduce((n, x) => n + x.cpuSeconds, 0) / s.reduce((n, x) => n + x.handshakes, 0)) * 1e6;
      const range = `${Math.min(...s.map((x) => x.perSecond)).toFixed(0)}–${Math.max(...s.map((x) => x.perSecond)).toFixed(0)}`;
      return `| ${p.name.replace(/ TLS$/, '')} | ${perSecond.toFixed(0)} | ${range} | ${ratio.toFixed(2)} | ${cpu.toFixed(0)} |`;
    });
    return `
## TLS handshakes per second (new sessions, no resumption)

Method: one ECDSA P-256 certificate (made by Tarmac's own generator) served by nginx (\`ssl_session_cache off\`,
\`ssl_session_tickets off\`, one worker per core), HAProxy (\`tune.ssl.cachesize 0\`, \`no-tls-tickets\`, one thread per
core) and Tarmac's TLS listener (one process, and two \`node:cluster\` workers), each answering on loopback.
${clients} \`openssl s_time -new\` clients run at once for ${o.seconds} s per run (every connection a full handshake, TLS 1.3
with X25519, no request sent, no SNI: Tarmac serves its default certificate, set to the same one), ${o.rounds} rounds
interleaved with the order rotated. Handshakes/s is the clients' sum of connections over their wall time (median of
rounds); the ratio is each round's figure over nginx's in the same round (median); CPU µs/handshake is the server's
process-tree CPU over handshakes. The clients share the two cores with the servers, so absolute figures are bounded
by the client side too: compare ratios.

| server | handshakes/s | range | ratio to nginx | server CPU µs/handshake |
|---|---|---|---|---|
${rows.join('\n')}

What limits Tarmac here: the handshake's cryptography runs in OpenSSL for all three, but Node adds per-connection
JavaScript (the TLSSocket and its wrap, the SNI callback's promise, ALPN dispatch to node:http or node:http2) and one
process uses one core; the cluster spreads handshakes over both. Resumption (tickets, on by default in Node) would make
returning clients far cheaper and is left out on purpose.
`;
  } finally {
    for (const p of peers.reverse()) await p.stop();
  }
}
