// One error class for failures people can act on: a stable code, an HTTP status, a sentence.
/** Every error code Tarmac reports, with its HTTP status. Documented in docs/errors.md (a test checks). */
export const errorStatus = {
  invalid_argument: 400,
  unauthorized: 401,
  forbidden: 403,
  not_found: 404,
  app_not_found: 404,
  machine_not_found: 404,
  method_not_allowed: 405,
  timeout: 408,
  name_taken: 409,
  conflict: 409,
  lease_held: 409,
  failed_precondition: 412,
  payload_too_large: 413,
  no_capacity: 503,
  unavailable: 503,
  image_pull_failed: 422,
  internal: 500,
} as const;

export type ErrorCode = keyof typeof errorStatus;

export class TarmacError extends Error {
  override readonly name = 'TarmacError';
  constructor(
    readonly code: ErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
  get httpStatus(): number {
    return errorStatus[this.code];
  }
}

export function isTarmacError(e: unknown): e is TarmacError {
  return e instanceof TarmacError;
}

/** Message of any thrown value, for logs and one-line CLI errors. */
export function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
