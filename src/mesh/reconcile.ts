// One reconciliation at a time: a change during one schedules exactly one more; a failure retries after a second.

export class Reconciler {
  readonly #apply: () => Promise<void>;
  readonly #onError: (e: unknown) => void;
  #running: Promise<void> | undefined;
  #dirty = false;
  #closed = false;
  #retry: NodeJS.Timeout | undefined;

  /** `apply` makes the world equal to the catalog as it is when it runs; `onError` reports a failed run (retried in 1 s). */
  constructor(apply: () => Promise<void>, onError: (e: unknown) => void) {
    this.#apply = apply;
    this.#onError = onError;
  }

  /** Schedules a reconciliation; resolves when the catalog as it is now has been applied (or failed to). */
  kick(): Promise<void> {
    this.#dirty = true;
    this.#running ??= this.#loop().finally(() => (this.#running = undefined));
    return this.#running;
  }

  async #loop(): Promise<void> {
    while (this.#dirty && !this.#closed) {
      this.#dirty = false;
      try {
        await this.#apply();
      } catch (e) {
        this.#onError(e);
        clearTimeout(this.#retry);
        this.#retry = setTimeout(() => void this.kick(), 1000);
        return;
      }
    }
  }

  /** Stops scheduling; resolves when a run in progress has ended. */
  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#retry);
    await this.#running;
  }
}
