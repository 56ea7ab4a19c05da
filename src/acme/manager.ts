// Runs ACME orders for certificate rows: takes a row by compare-and-swap, publishes its challenges in it, stores the certificate.
import * as acme from 'acme-client';
import type { AcmeChallenge, Catalog, CatalogChange, Certificate, CertificateAcme } from '../catalog/index.ts';
import { certificateFromPem, isCertificateProblem } from '../catalog/index.ts';
import { TarmacError, errorMessage, isTarmacError } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';
import { openAcmeAccount, type AcmeAccountOptions } from './account.ts';
import { acmeDue, type AcmePolicy } from './due.ts';

/** Challenge types the proxy answers (DNS-01 needs a DNS provider: not offered). */
export type AcmeChallengeType = AcmeChallenge['type'];

export interface AcmeManagerOptions {
  catalog: Catalog;
  /** This host: written into the rows it takes. */
  hostId: string;
  account: AcmeAccountOptions;
  /** Challenge types to use, most preferred first. */
  challenges: readonly AcmeChallengeType[];
  policy: AcmePolicy;
  /** How often every row is checked for renewal, takeover and retry. */
  checkIntervalMs: number;
  log: Logger;
}

/** Orders one host runs at once; the rest wait for a later check. */
const maxParallel = 4;

/** Thrown inside an order when its row changed under it (deleted, replaced, taken over): the order stops quietly. */
class RowChanged extends Error {}

/**
 * Issues and renews certificates through ACME for rows that ask for it (`acme` state, see `acmeDue`). Any host with
 * ACME on may take a row: the compare-and-swap that marks it `pending` with this host's id is the lock, so one order
 * runs per host name in the fleet. The challenges go into the row, where every proxy answers them.
 */
export class AcmeManager {
  readonly #o: AcmeManagerOptions;
  readonly #running = new Map<string, Promise<void>>();
  readonly #abort = new AbortController();
  #client: Promise<acme.Client> | undefined;
  #timer: NodeJS.Timeout | undefined;
  #unsubscribe: (() => void) | undefined;

  constructor(opts: AcmeManagerOptions) {
    this.#o = opts;
  }

  /** Starts watching the catalog for requests and checking every row on a timer (and once now). */
  start(): void {
    this.#unsubscribe = this.#o.catalog.subscribe((batch) => this.#onChanges(batch.changes));
    this.#timer = setInterval(() => this.check(), this.#o.checkIntervalMs);
    this.#timer.unref();
    this.check();
  }

  /** Takes every row that is due now (renewals, stale or failed orders, requests nobody took). */
  check(): void {
    const now = Date.now();
    for (const cert of this.#o.catalog.listCertificates()) {
      if (this.#due(cert, now)) void this.take(cert.hostname);
    }
  }

  /**
   * Starts an order for a host name if its row is due and no order of this host runs for it; false when it did not
   * (not due, busy, or another host took the row first). Resolves once the row is taken, not when the order ends.
   */
  async take(hostname: string): Promise<boolean> {
    if (this.#running.has(hostname) || this.#running.size >= maxParallel || this.#abort.signal.aborted) return false;
    const held = this.#o.catalog.getCertificate(hostname);
    if (held === undefined || !this.#due(held, Date.now())) return false;
    const lock = this.#put(held, { ...held, acme: { status: 'pending', host_id: this.#o.hostId, challenges: [], updated_at: new Date().toISOString() } });
    const run = lock.then((row) => this.#order(row), (err: unknown) => {
      if (!(err instanceof RowChanged)) this.#o.log.error({ hostname, err: errorMessage(err) }, 'ACME order could not be started');
    }).finally(() => {
      this.#running.delete(hostname);
      if (!this.#abort.signal.aborted) this.check(); // requests left waiting while this host was at maxParallel
    });
    this.#running.set(hostname, run);
    return lock.then(() => true, () => false);
  }

  /** Resolves when no order of this host runs. */
  async idle(): Promise<void> {
    while (this.#running.size > 0) await Promise.allSettled([...this.#running.values()]);
  }

  /** Stops checking and abandons running orders at their next step (their rows are taken over once stale). */
  async close(): Promise<void> {
    this.#abort.abort();
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#unsubscribe?.();
    await this.idle();
  }

  /** Due by the policy, or pending on this host without an order running here (this host restarted mid-order). */
  #due(cert: Certificate, now: number): boolean {
    const a = cert.acme;
    if (a?.status === 'pending' && a.host_id === this.#o.hostId && !this.#running.has(cert.hostname)) return true;
    return acmeDue(cert, now, this.#o.policy);
  }

  #onChanges(changes: readonly CatalogChange[]): void {
    for (const c of changes) {
      // A new request: pending with no host. Other states are the timer's business.
      if (c.kind === 'certificate' && c.op === 'put' && c.value?.acme?.status === 'pending' && c.value.acme.host_id === undefined) {
        void this.take(c.key);
      }
    }
  }

  /** Runs the order for a taken row to its end: issued, or failed with the reason in the row. Never rejects. */
  async #order(taken: Certificate): Promise<void> {
    const { hostname, app } = taken;
    const log = this.#o.log.child({ hostname, app });
    let row = taken;
    const withAcme = (acmeState: CertificateAcme): Certificate => ({ ...row, acme: acmeState });
    const now = () => new Date().toISOString();
    try {
      log.info('ACME order starting');
      const client = await this.#step(this.#account());
      const order = await this.#step(client.createOrder({ identifiers: [{ type: 'dns', value: hostname }] }));
      const authzs = await this.#step(client.getAuthorizations(order));
      const picks = authzs.filter((a) => a.status !== 'valid').map((authz) => {
        const challenge = this.#o.challenges.map((t) => authz.challenges.find((c) => c.type === t)).find((c) => c !== undefined);
        if (challenge === undefined) {
          throw new TarmacError('failed_precondition', `the ACME server offers none of the configured challenge types (${this.#o.challenges.join(', ')}) for ${authz.identifier.value}`);
        }
        return challenge;
      });
      const challenges: AcmeChallenge[] = [];
      for (const c of picks) {
        challenges.push({ type: c.type as AcmeChallengeType, token: c.token, key_authorization: await client.getChallengeKeyAuthorization(c) });
      }
      if (challenges.length > 0) row = await this.#put(row, withAcme({ ...row.acme!, challenges, updated_at: now() }));
      for (const c of picks) {
        await this.#step(client.completeChallenge(c));
        await this.#step(client.waitForValidStatus(c));
      }
      const key = await acme.crypto.createPrivateEcdsaKey('P-256');
      const [, csr] = await acme.crypto.createCsr({ commonName: hostname, altNames: [hostname] }, key);
      const finalized = await this.#step(client.finalizeOrder(order, csr));
      const fullchain = await this.#step(client.getCertificate(finalized));
      const issued = certificateFromPem({ hostname, app, source: 'acme', fullchain, private_key: key.toString() });
      if (isCertificateProblem(issued)) throw new Error(`the ACME server issued an unusable certificate: ${issued.field} ${issued.message}`);
      row = await this.#put(row, { ...issued, created_at: row.created_at, acme: { status: 'issued', challenges: [], updated_at: now() } });
      log.info({ not_after: row.not_after }, 'ACME certificate issued');
    } catch (err) {
      if (err instanceof RowChanged || this.#abort.signal.aborted) {
        log.info({ reason: errorMessage(err) }, 'ACME order abandoned');
        return;
      }
      if (!isTarmacError(err)) this.#client = undefined; // a new account session next time (directory or nonce trouble)
      const error = errorMessage(err);
      log.warn({ err: error }, 'ACME order failed');
      await this.#put(row, withAcme({ status: 'failed', challenges: [], error, updated_at: now() })).catch((e: unknown) => {
        if (!(e instanceof RowChanged)) log.error({ err: errorMessage(e) }, 'ACME failure could not be recorded');
      });
    }
  }

  /** Compare-and-swap of a row this order holds; RowChanged when it is no longer the row it expects. */
  async #put(expect: Certificate, next: Certificate): Promise<Certificate> {
    try {
      await this.#o.catalog.putCertificate(next, { expect });
    } catch (err) {
      if (isTarmacError(err) && ['conflict', 'app_not_found', 'name_taken'].includes(err.code)) throw new RowChanged(err.message, { cause: err });
      throw err;
    }
    return next;
  }

  #account(): Promise<acme.Client> {
    this.#client ??= openAcmeAccount(this.#o.account);
    this.#client.catch(() => { this.#client = undefined; });
    return this.#client;
  }

  /** One network step of an order, cut short when the manager closes (the request itself is left to finish). */
  #step<T>(p: Promise<T>): Promise<T> {
    const signal = this.#abort.signal;
    signal.throwIfAborted();
    return new Promise<T>((resolve, reject) => {
      const onAbort = () => reject(signal.reason);
      signal.addEventListener('abort', onAbort, { once: true });
      p.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
    });
  }
}
