// An etcd lease kept alive by this process, its one stream and one timer owned here, so that closing it stops both.
import type { Etcd3, IDuplexStream, ILeaseKeepAliveRequest, ILeaseKeepAliveResponse } from 'etcd3';

type KeepAliveStream = IDuplexStream<ILeaseKeepAliveRequest, ILeaseKeepAliveResponse>;

/** Pause before a failed keepalive stream is opened again. */
const reconnectMs = 200;

/**
 * A granted etcd lease, renewed every third of its TTL over one LeaseKeepAlive stream at a time. A stream that fails,
 * ends or stays silent for a TTL is cancelled and a new one opened after a pause; a replaced stream's events are
 * ignored, so there is never more than one stream and one timer. `onLost` is called once, when etcd says the lease is
 * gone or nothing renewed it for two TTLs (etcd has let it expire by then). `close` cancels the stream and the timer.
 *
 * Instead of etcd3's `Lease`: its keepalive loop forks when a stream it already replaced fails too (etcd silent for a
 * TTL, then the connection drops: `handleKeepaliveError` runs for the old stream and the new one), and the forked
 * loops' renewal intervals survive `release()` and `client.close()`, keeping the process alive for ever.
 */
export class KeptLease {
  readonly #client: Etcd3;
  readonly #ttlMs: number;
  readonly #onLost: (err: Error) => void;
  #renewedAt = Date.now();
  #stream: KeepAliveStream | undefined;
  /** The next renewal, or the next attempt to open a stream. */
  #timer: NodeJS.Timeout | undefined;
  /** Counts attempts to open a stream: only the latest may install its stream. */
  #attempt = 0;
  #closed = false;

  /** Grants a lease of `ttlSeconds` (fails as the etcd call does) and keeps it alive until closed or lost. */
  static async grant(client: Etcd3, ttlSeconds: number, onLost: (err: Error) => void): Promise<KeptLease> {
    const res = await client.leaseClient.leaseGrant({ TTL: ttlSeconds });
    return new KeptLease(client, res.ID, ttlSeconds, onLost);
  }

  private constructor(client: Etcd3, readonly id: string, ttlSeconds: number, onLost: (err: Error) => void) {
    this.#client = client;
    this.#ttlMs = ttlSeconds * 1000;
    this.#onLost = onLost;
    this.#connect();
  }

  /** Stops renewing (the lease expires on etcd after its TTL unless revoked). */
  close(): void {
    this.#closed = true;
    this.#drop();
  }

  #connect(): void {
    if (this.#closed) return;
    if (Date.now() - this.#renewedAt > 2 * this.#ttlMs) {
      this.#lose(new Error(`etcd lease ${this.id} was not renewed for ${(2 * this.#ttlMs) / 1000} s`));
      return;
    }
    const attempt = ++this.#attempt;
    this.#client.leaseClient.leaseKeepAlive().then((stream) => {
      stream.on('error', () => this.#failed(stream)); // also what cancel() ends in: ignored then, as the stream is replaced
      if (this.#closed || attempt !== this.#attempt) {
        stream.end();
        stream.cancel();
        return;
      }
      this.#stream = stream;
      let heardAt = Date.now();
      stream.on('end', () => this.#failed(stream));
      stream.on('data', (res: ILeaseKeepAliveResponse) => {
        if (this.#stream !== stream) return;
        if (!(Number(res.TTL) > 0)) {
          this.#lose(new Error(`etcd lease ${this.id} has expired or was revoked`));
          return;
        }
        heardAt = this.#renewedAt = Date.now();
      });
      const renew = () => {
        if (this.#stream !== stream) return;
        if (Date.now() - heardAt > this.#ttlMs) {
          this.#failed(stream); // silent for a TTL: a member that lost its leader, or a connection gone quiet
          return;
        }
        stream.write({ ID: this.id });
        this.#schedule(renew, this.#ttlMs / 3);
      };
      renew();
    }, () => {
      if (attempt === this.#attempt && !this.#closed) this.#schedule(() => this.#connect(), reconnectMs);
    });
  }

  /** The current stream failed or ended: drop it and open another after a pause. A replaced stream's end is ignored. */
  #failed(stream: KeepAliveStream): void {
    if (this.#stream !== stream || this.#closed) return;
    this.#drop();
    this.#schedule(() => this.#connect(), reconnectMs);
  }

  #schedule(fn: () => void, ms: number): void {
    clearTimeout(this.#timer);
    this.#timer = setTimeout(fn, ms);
    this.#timer.unref(); // a lease never keeps the process alive by itself
  }

  #drop(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const stream = this.#stream;
    this.#stream = undefined;
    // Ended before cancelled: etcd3 takes an error on a stream still open for writing (as cancel() ends in) for a failure
    // of the member, and then closes every client of it.
    stream?.end();
    stream?.cancel();
  }

  #lose(err: Error): void {
    if (this.#closed) return;
    this.close();
    this.#onLost(err);
  }
}
