// A private LAN of network namespaces for multi-host tests: one bridge namespace, N host namespaces on it, and a
// veth from the test's own namespace so the test can reach the hosts. Everything is removed by close().
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface LanHost {
  /** Network namespace name (under /var/run/netns). */
  ns: string;
  /** The host's IPv4 address on the LAN. */
  address: string;
  /** Command prefix that runs a program inside the namespace. */
  wrap: string[];
}

export interface Lan {
  hosts: LanHost[];
  /** The test's own address on the LAN (where a registry it starts can listen). */
  testAddress: string;
  close(): Promise<void>;
}

async function ip(...args: string[]): Promise<void> {
  await run('ip', args);
}

/** A /24 under 10.249/16 that no route of this namespace already covers. */
async function freeSubnet(): Promise<string> {
  const { stdout } = await run('ip', ['-4', 'route', 'show']);
  for (let i = 0; i < 50; i++) {
    const net = `10.249.${1 + Math.floor(Math.random() * 250)}`;
    if (!stdout.includes(`${net}.`)) return net;
  }
  throw new Error('no free 10.249.x.0/24 subnet for the test LAN');
}

/**
 * Creates `n` host namespaces on one bridge (in a namespace of its own) with addresses `10.249.X.1..n`, and links
 * the test's namespace to it at `10.249.X.254`. Loopback is up in every namespace.
 */
export async function createLan(n: number): Promise<Lan> {
  const tag = randomBytes(2).toString('hex');
  const lanNs = `tl${tag}`;
  const hostNs = Array.from({ length: n }, (_, i) => `th${tag}${i + 1}`);
  const testIf = `tlr${tag}`;
  const net = await freeSubnet();
  const close = async () => {
    for (const ns of [...hostNs, lanNs]) await ip('netns', 'del', ns).catch(() => undefined);
    await ip('link', 'del', testIf).catch(() => undefined); // gone with its peer already, normally
  };
  try {
    await ip('netns', 'add', lanNs);
    await ip('-n', lanNs, 'link', 'set', 'lo', 'up');
    await ip('-n', lanNs, 'link', 'add', 'br0', 'type', 'bridge');
    await ip('-n', lanNs, 'link', 'set', 'br0', 'up');
    const hosts: LanHost[] = [];
    for (let i = 0; i < n; i++) {
      const ns = hostNs[i]!;
      await ip('netns', 'add', ns);
      await ip('-n', ns, 'link', 'set', 'lo', 'up');
      await ip('-n', lanNs, 'link', 'add', `p${i + 1}`, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns);
      await ip('-n', lanNs, 'link', 'set', `p${i + 1}`, 'master', 'br0', 'up');
      const address = `${net}.${i + 1}`;
      await ip('-n', ns, 'addr', 'add', `${address}/24`, 'dev', 'eth0');
      await ip('-n', ns, 'link', 'set', 'eth0', 'up');
      hosts.push({ ns, address, wrap: ['nsenter', `--net=/var/run/netns/${ns}`] });
    }
    await ip('link', 'add', testIf, 'type', 'veth', 'peer', 'name', 'ptest', 'netns', lanNs);
    await ip('-n', lanNs, 'link', 'set', 'ptest', 'master', 'br0', 'up');
    await ip('addr', 'add', `${net}.254/24`, 'dev', testIf);
    await ip('link', 'set', testIf, 'up');
    return { hosts, testAddress: `${net}.254`, close };
  } catch (e) {
    await close();
    throw e;
  }
}
