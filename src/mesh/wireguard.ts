// The host's WireGuard interface: kernel WireGuard where the module loads, Debian's wireguard-go otherwise; whole
// configurations applied with `wg syncconf`, never a command per peer.
import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { access, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { TarmacError } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';
import { hostMeshAddress } from './addressing.ts';

/** Where userspace WireGuard puts its control sockets (one per interface, shared by every network namespace). */
const UAPI_DIR = '/var/run/wireguard';

/** Runs `[...wrap, cmd, ...args]` with `input` on stdin; resolves with stdout, rejects with stderr on failure. */
export function run(wrap: readonly string[], cmd: string, args: string[], input = ''): Promise<string> {
  const [bin, ...rest] = [...wrap, cmd, ...args];
  return new Promise((resolve, reject) => {
    const child = spawn(bin!, rest, { stdio: [input ? 'pipe' : 'ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
    child.on('error', (e: NodeJS.ErrnoException) => reject(e.code === 'ENOENT'
      ? new TarmacError('failed_precondition', `${cmd} is not installed: apt-get install wireguard-tools wireguard-go nftables iproute2 (the mesh needs them)`, { cause: e })
      : e));
    child.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} ${args.join(' ')} failed (${code}): ${err.trim()}`))));
    child.stdin?.on('error', () => {}).end(input); // a failing command may exit before reading: its exit code tells
  });
}

async function linkExists(wrap: readonly string[], ifname: string): Promise<boolean> {
  return run(wrap, 'ip', ['link', 'show', 'dev', ifname]).then(() => true, () => false);
}

const exists = (p: string) => access(p).then(() => true, () => false);

export interface InterfaceOptions {
  ifname: string;
  hostNumber: number;
  /** Directory for wireguard-go's pid file and log. */
  stateDir: string;
  wrap: readonly string[];
  log: Logger;
}

/**
 * Turns IPv6 forwarding on without losing router advertisements: with forwarding on, the kernel ignores RAs on every
 * interface whose accept_ra is 1, so an uplink configured by SLAAC would lose its default route when the RA lifetime
 * ends. Those interfaces (and the default for new ones) get accept_ra=2 first: accept RAs even when forwarding.
 */
const enableForwarding = [
  'for f in /proc/sys/net/ipv6/conf/*/accept_ra; do',
  '  i=${f%/accept_ra}; i=${i##*/}',
  '  case "$i" in all|lo|tm*) continue ;; esac',
  '  [ "$(cat "$f")" = 1 ] && echo 2 > "$f"',
  'done',
  'sysctl -qw net.ipv6.conf.all.forwarding=1',
].join('\n');

/** Turns IPv6 forwarding on, router advertisements kept (see enableForwarding). */
export async function enableIpv6Forwarding(wrap: readonly string[]): Promise<void> {
  await run(wrap, 'sh', ['-c', enableForwarding]);
}

/**
 * Makes sure traffic between machines can be forwarded: nothing to do where the kernel forwards per interface
 * (`force_forwarding`, Linux 6.17+; machine interfaces get it when they are made), host-wide forwarding elsewhere.
 */
export async function enableMachineForwarding(wrap: readonly string[]): Promise<'per-interface' | 'host-wide'> {
  const out = await run(wrap, 'sh', ['-c', `if [ -e /proc/sys/net/ipv6/conf/default/force_forwarding ]; then echo per-interface; else\n${enableForwarding}\necho host-wide; fi`]);
  return out.trim() === 'per-interface' ? 'per-interface' : 'host-wide';
}

/**
 * Makes sure `ifname` exists, is up, holds the host's mesh address and carries fdaa::/16 (every other host's
 * machines, in machine form: the firewall rewrites them on the way out), with IPv6 forwarding on. An interface left
 * by an earlier run of the host (wireguard-go keeps running, like machines) is reused. Returns the implementation.
 */
export async function ensureInterface(o: InterfaceOptions): Promise<'kernel' | 'wireguard-go'> {
  let kind: 'kernel' | 'wireguard-go' = 'kernel';
  if (await linkExists(o.wrap, o.ifname)) {
    if (await exists(join(UAPI_DIR, `${o.ifname}.sock`))) kind = 'wireguard-go';
  } else if (!(await run(o.wrap, 'ip', ['link', 'add', o.ifname, 'type', 'wireguard']).then(() => true, () => false))) {
    kind = 'wireguard-go';
    await startWireguardGo(o);
  }
  await run(o.wrap, 'ip', ['-batch', '-'], [
    `link set ${o.ifname} up`,
    `addr replace ${hostMeshAddress(o.hostNumber)}/128 dev ${o.ifname} nodad`,
    `route replace fdaa::/16 dev ${o.ifname}`,
  ].join('\n') + '\n');
  await enableIpv6Forwarding(o.wrap);
  o.log.info({ interface: o.ifname, implementation: kind }, 'mesh interface ready');
  return kind;
}

/** Starts wireguard-go for `ifname` in its own session (it outlives the host process) and waits for its socket. */
async function startWireguardGo(o: InterfaceOptions): Promise<void> {
  await mkdir(UAPI_DIR, { recursive: true, mode: 0o755 });
  await mkdir(o.stateDir, { recursive: true, mode: 0o700 });
  const logFd = openSync(join(o.stateDir, 'wireguard-go.log'), 'a');
  const [bin, ...rest] = [...o.wrap, 'wireguard-go', '-f', o.ifname];
  const child = spawn(bin!, rest, { detached: true, stdio: ['ignore', logFd, logFd] });
  closeSync(logFd);
  const failed = new Promise<never>((_, reject) => {
    child.once('error', (e: NodeJS.ErrnoException) => reject(e.code === 'ENOENT'
      ? new TarmacError('failed_precondition', 'no WireGuard: the kernel module is missing and wireguard-go is not installed (apt-get install wireguard-go wireguard-tools)', { cause: e })
      : e));
    child.once('exit', (code) => reject(new Error(`wireguard-go ${o.ifname} exited (${code}); see ${join(o.stateDir, 'wireguard-go.log')}`)));
  });
  failed.catch(() => {});
  child.unref();
  await writeFile(join(o.stateDir, 'wireguard-go.pid'), `${child.pid}\n`);
  const socket = join(UAPI_DIR, `${o.ifname}.sock`);
  const deadline = Date.now() + 10_000;
  while (!(await exists(socket))) {
    if (Date.now() > deadline) throw new TarmacError('internal', `wireguard-go did not open ${socket} within 10 s`);
    await Promise.race([failed, new Promise((r) => setTimeout(r, 20))]);
  }
}

/**
 * Replaces the interface's whole configuration (keys, port, every peer) with `config` in one `wg syncconf`, through a
 * file in `stateDir` (0600: it holds the private key; `wg` cannot read a socket as its stdin file).
 */
export async function applyConfig(o: { wrap: readonly string[]; ifname: string; stateDir: string }, config: string): Promise<void> {
  const file = join(o.stateDir, `${o.ifname}.conf`);
  await writeFile(file, config, { mode: 0o600 });
  await run(o.wrap, 'wg', ['syncconf', o.ifname, file]);
}

/**
 * Removes the mesh interface: stops the wireguard-go this host started (pid file in `stateDir`) or deletes the kernel
 * interface. For uninstalling a host and for tests; a host's `close()` leaves the mesh up for its machines.
 */
export async function removeInterface(o: { ifname: string; stateDir: string; wrap: readonly string[] }): Promise<void> {
  const pidFile = join(o.stateDir, 'wireguard-go.pid');
  const pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
  if (Number.isInteger(pid) && pid > 0) {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      /* already gone */
    }
    const deadline = Date.now() + 5_000;
    while (Date.now() < deadline && (await exists(`/proc/${pid}`))) await new Promise((r) => setTimeout(r, 20));
    await rm(pidFile, { force: true });
  }
  await run(o.wrap, 'ip', ['link', 'del', o.ifname]).catch(() => {});
  await rm(join(UAPI_DIR, `${o.ifname}.sock`), { force: true });
}
