// `tarmac ips`: an app's own addresses shown as a table.
import type { IpAssignmentResponse } from '../client/index.ts';
import { ago, table, type Style } from './format.ts';

export function ipsTable(ips: readonly IpAssignmentResponse[], style: Style, now = Date.now()): string {
  return table(['version', 'ip', 'type', 'region', 'created'], ips.map((ip) => [ip.type, ip.ip, ip.shared ? 'shared' : 'dedicated', ip.region, ago(ip.created_at, now)]), style);
}
