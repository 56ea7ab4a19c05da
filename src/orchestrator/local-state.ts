// The worker's durable record of each machine instance it runs: every lifecycle step, in the host's SQLite.
import Database from 'better-sqlite3';

/** Steps of an instance's lifecycle on this host; `steps` keeps their history. */
export type Step = 'pulling' | 'preparing' | 'starting' | 'running' | 'stopping' | 'exited' | 'removing' | 'removed';

export interface InstanceRow {
  machine_id: string;
  instance_id: string;
  driver: string;
  state_dir: string;
  step: Step;
  /** Exits handled by policy restarts for this instance. */
  restarts: number;
  /** restart_generation of the spec this instance honours. */
  generation: number;
  /** Set while a stop that we asked for is in progress, so its exit is not treated as a crash. */
  stop_requested: number;
  /** While stopping: when (epoch ms) the grace ends and SIGKILL follows; a restarted host resumes the same deadline. 0 otherwise. */
  stop_deadline: number;
  /** After an exit the restart policy restarts: when (epoch ms) the backoff ends and the instance starts again. 0 otherwise. */
  restart_at: number;
  updated_at: string;
}

export class LocalState {
  readonly #db: Database.Database;
  readonly #get;
  readonly #all;
  readonly #put;
  readonly #del;
  readonly #log;
  readonly #known;

  constructor(path: string) {
    this.#db = new Database(path);
    this.#db.pragma('journal_mode = WAL');
    this.#db.pragma('synchronous = NORMAL');
    this.#db.exec(`
      CREATE TABLE IF NOT EXISTS instances (
        machine_id TEXT PRIMARY KEY, instance_id TEXT NOT NULL, driver TEXT NOT NULL, state_dir TEXT NOT NULL,
        step TEXT NOT NULL, restarts INTEGER NOT NULL, generation INTEGER NOT NULL, stop_requested INTEGER NOT NULL,
        updated_at TEXT NOT NULL);
      CREATE TABLE IF NOT EXISTS steps (seq INTEGER PRIMARY KEY AUTOINCREMENT, machine_id TEXT NOT NULL, instance_id TEXT NOT NULL,
        step TEXT NOT NULL, at TEXT NOT NULL, detail TEXT);`);
    // Columns added after the first release: add them to an existing file.
    const columns = new Set((this.#db.pragma('table_info(instances)') as Array<{ name: string }>).map((c) => c.name));
    for (const c of ['stop_deadline', 'restart_at']) {
      if (!columns.has(c)) this.#db.exec(`ALTER TABLE instances ADD COLUMN ${c} INTEGER NOT NULL DEFAULT 0`);
    }
    this.#get = this.#db.prepare('SELECT * FROM instances WHERE machine_id = ?');
    this.#all = this.#db.prepare('SELECT * FROM instances ORDER BY machine_id');
    this.#put = this.#db.prepare(`INSERT OR REPLACE INTO instances
      (machine_id, instance_id, driver, state_dir, step, restarts, generation, stop_requested, stop_deadline, restart_at, updated_at)
      VALUES (@machine_id, @instance_id, @driver, @state_dir, @step, @restarts, @generation, @stop_requested, @stop_deadline, @restart_at, @updated_at)`);
    this.#del = this.#db.prepare('DELETE FROM instances WHERE machine_id = ?');
    this.#log = this.#db.prepare('INSERT INTO steps (machine_id, instance_id, step, at, detail) VALUES (?, ?, ?, ?, ?)');
    this.#known = this.#db.prepare('SELECT DISTINCT machine_id FROM steps');
  }

  get(machineId: string): InstanceRow | undefined {
    return this.#get.get(machineId) as InstanceRow | undefined;
  }
  all(): InstanceRow[] {
    return this.#all.all() as InstanceRow[];
  }
  /** Records a step: the row and its history change in one transaction. */
  record(row: InstanceRow, detail?: string): InstanceRow {
    const next = { ...row, updated_at: new Date().toISOString() };
    this.#db.transaction(() => {
      this.#put.run(next);
      this.#log.run(row.machine_id, row.instance_id, row.step, next.updated_at, detail ?? null);
    })();
    return next;
  }
  /** Every machine this host ever recorded a step for (the history outlives instances): what it may own on the system. */
  knownMachines(): string[] {
    return (this.#known.all() as Array<{ machine_id: string }>).map((r) => r.machine_id);
  }
  remove(machineId: string): void {
    this.#del.run(machineId);
  }
  close(): void {
    if (this.#db.open) this.#db.close();
  }
}
