// Live progress of a machine's events while the CLI waits: one line per phase, pull progress rewritten in place on a terminal.
import type { MachineEventResponse } from '../client/index.ts';
import { eventDetail, formatBytes, paint, type Style } from './format.ts';

/** Seconds with one decimal below a minute ("0.4s", "12.3s"), else minutes and seconds. */
export function seconds(ms: number): string {
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)}s`;
  return `${Math.floor(ms / 60_000)}m${Math.round((ms % 60_000) / 1000)}s`;
}

function num(v: unknown): number | undefined {
  return typeof v === 'number' && Number.isFinite(v) ? v : undefined;
}

/** "512.0 KB of 1.1 MB (45%), 2 layers" from a pull event's {bytes, total, layers}; '' when it has none. */
function pullAmount(req: Record<string, unknown>, done: boolean): string {
  const bytes = num(req['bytes']);
  const total = num(req['total']);
  const layers = num(req['layers']);
  const parts: string[] = [];
  if (done && (total ?? bytes) !== undefined) parts.push(formatBytes(total ?? bytes!));
  else if (bytes !== undefined && total !== undefined && total > 0) {
    parts.push(`${formatBytes(bytes)} of ${formatBytes(total)} (${Math.min(100, Math.floor((bytes / total) * 100))}%)`);
  } else if (bytes !== undefined) parts.push(formatBytes(bytes));
  if (layers !== undefined) parts.push(`${layers} layer${layers === 1 ? '' : 's'}`);
  return parts.join(', ');
}

/**
 * One progress line: "  pull     pulling  127.0.0.1:5000/hello:latest  512.0 KB of 1.1 MB (45%), 1 layer".
 * `startingAt` (the time of the machine's `start starting` event) lets a `started` line say how long it took.
 */
export function progressLine(e: MachineEventResponse, style: Style, startingAt?: number): string {
  const req = e.request ?? {};
  let detail: string;
  if (e.type === 'pull' && (e.status === 'pulling' || e.status === 'pulled')) {
    const done = e.status === 'pulled';
    const image = typeof req['image'] === 'string' ? req['image'] : '';
    const digest = done && typeof req['digest'] === 'string' ? req['digest'].replace(/^(sha256:[0-9a-f]{12})[0-9a-f]+$/, '$1') : '';
    detail = [image, [pullAmount(req, done), digest].filter(Boolean).join(', ')].filter(Boolean).join('  ');
  } else if (e.type === 'start' && e.status === 'started') {
    const pullMs = num(req['pull_ms']);
    const took = startingAt !== undefined && e.timestamp >= startingAt ? `in ${seconds(e.timestamp - startingAt)}` : '';
    // A cached image takes next to no time: only a real pull is worth its own figure.
    detail = [took, pullMs !== undefined && pullMs >= 50 ? `(image ${seconds(pullMs)})` : ''].filter(Boolean).join(' ');
  } else {
    detail = eventDetail(e);
  }
  const head = `  ${paint(style, 'cyan', e.type.padEnd(8))} ${detail ? e.status.padEnd(8) : e.status}`;
  return detail ? `${head} ${paint(style, 'dim', detail)}` : head;
}

/**
 * Prints events as they arrive. Not on a terminal, each phase is one line: the first `pulling` event only,
 * then `pulled`. On a terminal, every `pulling` event rewrites the same line and `pulled` finishes it.
 */
export class Progress {
  #open = false;
  #pullingShown = false;
  #startingAt: number | undefined;
  constructor(
    private readonly write: (s: string) => Promise<void>,
    private readonly tty: boolean,
    private readonly style: Style,
  ) {}

  async event(e: MachineEventResponse): Promise<void> {
    if (e.type === 'start' && e.status === 'starting') this.#startingAt = e.timestamp;
    const line = progressLine(e, this.style, this.#startingAt);
    if (e.type === 'pull' && e.status === 'pulling') {
      if (this.tty) {
        await this.write(`${this.#open ? '\r\x1b[K' : ''}${line}`);
        this.#open = true;
        return;
      }
      if (this.#pullingShown) return;
      this.#pullingShown = true;
      await this.write(line + '\n');
      return;
    }
    if (e.type === 'pull' && this.#open) {
      // `pulled` replaces the live pulling line and ends it.
      this.#open = false;
      await this.write(`\r\x1b[K${line}\n`);
      return;
    }
    if (e.type === 'start' && e.status === 'starting') this.#pullingShown = false; // a new start may pull again
    await this.end();
    await this.write(line + '\n');
  }

  /** Ends a line left open by a terminal's live pull progress. */
  async end(): Promise<void> {
    if (this.#open) await this.write('\n');
    this.#open = false;
  }
}
