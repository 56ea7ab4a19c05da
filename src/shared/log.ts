// The logger type every component takes, and the root logger made where a host is wired.
import { pino, type Logger, type LoggerOptions } from 'pino';

export type { Logger };

/** Root logger. Secrets are redacted by key wherever they appear in fields. */
export function createLogger(opts: { level?: string; name?: string; destination?: NodeJS.WritableStream } = {}): Logger {
  const options: LoggerOptions = {
    level: opts.level ?? process.env['TARMAC_LOG_LEVEL'] ?? 'info',
    base: opts.name ? { name: opts.name } : null,
    redact: { paths: ['token', '*.token', 'authorization', '*.authorization', 'headers.authorization', 'secret', '*.secret'], censor: '[redacted]' },
  };
  return opts.destination ? pino(options, opts.destination as pino.DestinationStream) : pino(options);
}

/** A logger that drops everything, for tests and tools that do not want host logs. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
