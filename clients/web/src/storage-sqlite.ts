/**
 * The replica's storage in Node: one SQLite file through better-sqlite3
 * (12.x; an optional peer dependency, so browser bundles never see it).
 * Import it from `@agsync/web/sqlite`.
 *
 * One process opens a file at a time (a second replica on the same file
 * would have its own outbox view). WAL mode with synchronous=NORMAL: a
 * process crash (kill -9) loses nothing committed; a power cut may lose the
 * last transactions (pass `synchronous: "FULL"` to wait for the disk).
 *
 * @module
 */
import Database from "better-sqlite3";
import type { DocRow, OutboxRow, ReplicaStorage, StorageSnapshot, StorageTx } from "./storage.js";

/** Options of {@link sqliteStore}. */
export interface SqliteStoreOptions {
  /** SQLite's synchronous setting. Default "NORMAL". */
  synchronous?: "NORMAL" | "FULL";
}

interface DocRecord {
  database: string;
  id: string;
  rev: string;
  seq: bigint;
  deleted: bigint;
  body: string | null;
}

function docOf(r: DocRecord): DocRow {
  return { database: r.database, id: r.id, rev: r.rev, seq: BigInt(r.seq), deleted: r.deleted !== 0n, body: r.body === null ? null : JSON.parse(r.body) };
}

function outboxOf(r: { row: string }): OutboxRow {
  return JSON.parse(r.row) as OutboxRow;
}

class SqliteStorage implements ReplicaStorage {
  readonly sharedName = undefined;
  readonly #db: Database.Database;
  readonly #s;
  #queue: Promise<unknown> = Promise.resolve();
  #closed = false;

  constructor(path: string, options: SqliteStoreOptions) {
    this.#db = new Database(path);
    this.#db.pragma("journal_mode = WAL");
    this.#db.pragma(`synchronous = ${options.synchronous ?? "NORMAL"}`);
    this.#db.pragma("busy_timeout = 5000");
    this.#db.exec(`
      CREATE TABLE IF NOT EXISTS docs (
        database TEXT NOT NULL, id TEXT NOT NULL, rev TEXT NOT NULL, seq INTEGER NOT NULL,
        deleted INTEGER NOT NULL, body TEXT, PRIMARY KEY (database, id)) WITHOUT ROWID;
      CREATE TABLE IF NOT EXISTS outbox (
        key TEXT PRIMARY KEY, database TEXT NOT NULL, id TEXT NOT NULL, row TEXT NOT NULL) WITHOUT ROWID;
      CREATE INDEX IF NOT EXISTS outbox_doc ON outbox (database, id, key);
      CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    `);
    const db = this.#db;
    this.#s = {
      allDocs: db.prepare("SELECT database, id, rev, seq, deleted, body FROM docs").safeIntegers(true),
      getDoc: db.prepare("SELECT database, id, rev, seq, deleted, body FROM docs WHERE database = ? AND id = ?").safeIntegers(true),
      putDoc: db.prepare("INSERT OR REPLACE INTO docs (database, id, rev, seq, deleted, body) VALUES (?, ?, ?, ?, ?, ?)"),
      clearDocs: db.prepare("DELETE FROM docs WHERE database = ?"),
      outboxOf: db.prepare("SELECT row FROM outbox WHERE database = ? AND id = ? ORDER BY key"),
      allOutbox: db.prepare("SELECT row FROM outbox ORDER BY key"),
      getOutbox: db.prepare("SELECT row FROM outbox WHERE key = ?"),
      putOutbox: db.prepare("INSERT OR REPLACE INTO outbox (key, database, id, row) VALUES (?, ?, ?, ?)"),
      deleteOutbox: db.prepare("DELETE FROM outbox WHERE key = ?"),
      allMeta: db.prepare("SELECT key, value FROM meta"),
      getMeta: db.prepare("SELECT value FROM meta WHERE key = ?"),
      setMeta: db.prepare("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"),
      deleteMeta: db.prepare("DELETE FROM meta WHERE key = ?"),
    };
  }

  #tx(): StorageTx {
    const s = this.#s;
    return {
      getDoc: (database, id) => {
        const r = s.getDoc.get(database, id) as DocRecord | undefined;
        return r && docOf(r);
      },
      putDoc: (row) => {
        s.putDoc.run(row.database, row.id, row.rev, row.seq, row.deleted ? 1 : 0, row.body === null ? null : JSON.stringify(row.body));
      },
      clearDocs: (database) => {
        s.clearDocs.run(database);
      },
      outboxOf: (database, id) => (s.outboxOf.all(database, id) as { row: string }[]).map(outboxOf),
      outboxOfDocs: (database, ids) => {
        const found = new Map<string, OutboxRow[]>();
        for (const id of ids) {
          const rows = (s.outboxOf.all(database, id) as { row: string }[]).map(outboxOf);
          if (rows.length > 0) found.set(id, rows);
        }
        return found;
      },
      allOutbox: () => (s.allOutbox.all() as { row: string }[]).map(outboxOf),
      getOutbox: (key) => {
        const r = s.getOutbox.get(key) as { row: string } | undefined;
        return r && outboxOf(r);
      },
      putOutbox: (row) => {
        s.putOutbox.run(row.key, row.database, row.id, JSON.stringify(row));
      },
      deleteOutbox: (key) => {
        s.deleteOutbox.run(key);
      },
      deleteOutboxes: (keys) => {
        for (const key of keys) s.deleteOutbox.run(key);
      },
      getMeta: (key) => (s.getMeta.get(key) as { value: string } | undefined)?.value,
      setMeta: (key, value) => {
        if (value === undefined) s.deleteMeta.run(key);
        else s.setMeta.run(key, value);
      },
    };
  }

  async load(): Promise<StorageSnapshot> {
    await this.#queue;
    return {
      docs: (this.#s.allDocs.all() as DocRecord[]).map(docOf),
      outbox: (this.#s.allOutbox.all() as { row: string }[]).map(outboxOf),
      meta: Object.fromEntries((this.#s.allMeta.all() as { key: string; value: string }[]).map((r) => [r.key, r.value])),
    };
  }

  transaction<T>(fn: (tx: StorageTx) => Promise<T>): Promise<T> {
    // better-sqlite3 is synchronous; `fn` only awaits this storage's own
    // (already settled) results, and the queue keeps transactions apart.
    const run = async () => {
      if (this.#closed) throw new Error("the SQLite store is closed");
      this.#db.exec("BEGIN IMMEDIATE");
      try {
        const result = await fn(this.#tx());
        this.#db.exec("COMMIT");
        return result;
      } catch (err) {
        if (this.#db.inTransaction) this.#db.exec("ROLLBACK");
        throw err;
      }
    };
    const result = this.#queue.then(run, run);
    this.#queue = result.catch(() => undefined);
    return result;
  }

  async close(): Promise<void> {
    await this.#queue;
    if (this.#closed) return;
    this.#closed = true;
    this.#db.close();
  }
}

/** A storage in a SQLite file at `path` (created if missing), for Node. */
export function sqliteStore(path: string, options: SqliteStoreOptions = {}): ReplicaStorage {
  return new SqliteStorage(path, options);
}
