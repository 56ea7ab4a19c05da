// etcd transactions that fail over: short attempts retried on another member, and safe to retry after an unknown outcome.
import { isRecoverableError, type Etcd3, type ICompare, type IRequestOp, type ITxnResponse } from 'etcd3';

export interface TxnRunnerOptions {
  /** Time for the whole call, over every attempt. */
  callTimeoutMs: number;
  /** Deadline of one attempt; a member that cannot commit in time (it lost its leader) is left for another. */
  attemptTimeoutMs: number;
}

export interface TxnRequest {
  compare: ICompare[];
  success: IRequestOp[];
  failure?: IRequestOp[];
  /**
   * After an attempt with an unknown outcome, when a later attempt's compare fails, read back whether the earlier
   * one was applied (every key it puts holds exactly its value, every key it deletes is gone) and report success if so.
   * Right for writes whose values are unique to the writer (rows with ids, timestamps, nonces); false for values another
   * writer could put too (counters), which then see a failed compare and read again, skipping a number at worst.
   */
  verify?: boolean;
}

/**
 * Runs etcd transactions with failover. An attempt that fails with a transport or server error (the member died, has
 * no leader, or did not commit within `attemptTimeoutMs`) is tried again, on a member picked afresh, until the call's
 * time is up; then the last error is thrown. A write's outcome after such a failure is unknown, and every write is a
 * transaction that is harmless to repeat: blind puts of the same value change nothing a reader sees (events are kept
 * once by id), and a compare-and-swap that did apply makes its own repetition fail its compare, which `verify` then
 * recognises as this writer's success instead of someone else's conflict. So nothing is ever applied twice.
 */
export class TxnRunner {
  readonly #client: Etcd3;
  readonly #o: TxnRunnerOptions;

  constructor(client: Etcd3, opts: TxnRunnerOptions) {
    this.#client = client;
    this.#o = opts;
  }

  async run(req: TxnRequest, signal?: AbortSignal): Promise<ITxnResponse> {
    const { compare, success, failure = [], verify = true } = req;
    const writes = success.some((op) => op.request_put || op.request_delete_range);
    const deadline = Date.now() + this.#o.callTimeoutMs;
    let uncertain = false; // an earlier attempt may have been applied
    for (let attempt = 0; ; attempt++) {
      const startedAt = Date.now();
      try {
        const res = await this.#client.kv.txn(
          { compare, success, failure },
          { deadline: startedAt + Math.max(1, Math.min(this.#o.attemptTimeoutMs, deadline - startedAt)) },
        );
        if (res.succeeded || !uncertain || !verify) return res;
        return (await this.appliedEarlier(success, signal)) ?? res;
      } catch (e) {
        if (!(e instanceof Error) || !isRecoverableError(e) || signal?.aborted) throw e;
        uncertain ||= writes;
        // A fast failure (refused, no leader yet) waits a little before the next member; a timed-out one has waited.
        const pause = Date.now() - startedAt < this.#o.attemptTimeoutMs / 2 ? Math.min(25 * 2 ** attempt, 250) : 0;
        if (Date.now() + pause >= deadline) throw e;
        if (pause > 0) await new Promise((r) => setTimeout(r, pause));
      }
    }
  }

  /**
   * A successful response for the operations `success` if etcd shows them applied (every key put holds exactly the value
   * put, every single key deleted is gone; read back with failover too), else undefined.
   */
  async appliedEarlier(success: IRequestOp[], signal?: AbortSignal): Promise<ITxnResponse | undefined> {
    const checks = success.filter((op) => op.request_put || (op.request_delete_range && !op.request_delete_range.range_end));
    if (checks.length === 0) return undefined; // only range deletes: nothing that tells
    const keyOf = (op: IRequestOp) => (op.request_put?.key ?? op.request_delete_range?.key)!;
    const read = await this.run({ compare: [], success: checks.map((op) => ({ request_range: { key: keyOf(op) } })) }, signal);
    const applied = checks.every((op, i) => {
      const kv = read.responses[i]?.response_range?.kvs[0];
      const put = op.request_put;
      return put ? kv !== undefined && kv.value.equals(Buffer.from(put.value as Buffer | string)) : kv === undefined;
    });
    if (!applied) return undefined;
    return {
      header: read.header,
      succeeded: true,
      responses: success.map((op) => (op.request_put ? { response_put: { header: read.header } } : { response_delete_range: { header: read.header, deleted: '1' } })),
    } as unknown as ITxnResponse;
  }
}
