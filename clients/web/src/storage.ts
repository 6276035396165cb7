/**
 * Where a replica keeps its data: the one storage interface, its row types,
 * and the in-memory store. IndexedDB ({@link indexedDbStore}, in
 * `storage-idb.ts`) and SQLite (`sqliteStore`, in `storage-sqlite.ts`,
 * imported from `@agsync/web/sqlite`) implement the same interface.
 *
 * A storage holds three tables: `docs` (the server's state of each document,
 * as last pulled or acknowledged), `outbox` (local edits not yet on the
 * server, in order) and `meta` (the sync position and the batch in flight).
 * It knows nothing of agsync's protocol: all rules live in the replica, and
 * every change of the replica is one {@link ReplicaStorage.transaction}.
 *
 * @module
 */
import type { JsonObject } from "@bufbuild/protobuf";

/** The server's state of one document, as the replica last saw it. */
export interface DocRow {
  database: string;
  id: string;
  /** The server revision ("N-<hash>"); a deleted document keeps its tombstone's. */
  rev: string;
  /** The seq of the write that produced `rev`. */
  seq: bigint;
  deleted: boolean;
  /** The body; null when deleted. */
  body: JsonObject | null;
}

/** One local edit waiting for the server. */
export interface OutboxRow {
  /** Orders the outbox (string order); unique, never reused. A merge replaces an entry under the same key. */
  key: string;
  /** The write's identity, chosen once (a UUID): sent as `request_id` of a Delete, reported in outcomes. */
  requestId: string;
  database: string;
  id: string;
  op: "put" | "delete";
  /** The new body of a put; null for a delete. */
  body: JsonObject | null;
  /**
   * The server revision the edit started from: "" when the document was not
   * on the server; null when an earlier edit of the same document was still
   * pending (it is set when that one is applied).
   */
  baseRev: string | null;
  /** The body the edit started from (what the app saw); null when there was no document. */
  baseBody: JsonObject | null;
  /** When it was queued (ms since the epoch). */
  createdAt: number;
  /** Set when a rejection was kept by the app: not sent again until retried. */
  failed?: { reason: string; message: string } | undefined;
  /** The request id of the edit this entry replaced after a merge, if any. */
  mergedFrom?: string | undefined;
}

/** What a storage holds, read whole when a replica opens. */
export interface StorageSnapshot {
  docs: DocRow[];
  /** In key order. */
  outbox: OutboxRow[];
  meta: Record<string, string>;
}

/**
 * The operations of one transaction. Methods may be synchronous or return
 * promises; callers always await them. Inside an IndexedDB transaction,
 * await nothing but these methods (the transaction commits when it has
 * nothing left to do).
 */
export interface StorageTx {
  getDoc(database: string, id: string): DocRow | undefined | Promise<DocRow | undefined>;
  putDoc(row: DocRow): void | Promise<void>;
  /** Removes every document row of a database. */
  clearDocs(database: string): void | Promise<void>;
  /** The outbox entries of one document, in key order. */
  outboxOf(database: string, id: string): OutboxRow[] | Promise<OutboxRow[]>;
  /** The outbox entries of many documents of one database, by id, each in key order (ids without entries are absent). */
  outboxOfDocs(database: string, ids: string[]): Map<string, OutboxRow[]> | Promise<Map<string, OutboxRow[]>>;
  /** Every outbox entry, in key order. */
  allOutbox(): OutboxRow[] | Promise<OutboxRow[]>;
  getOutbox(key: string): OutboxRow | undefined | Promise<OutboxRow | undefined>;
  /** Adds or replaces an entry by key. */
  putOutbox(row: OutboxRow): void | Promise<void>;
  deleteOutbox(key: string): void | Promise<void>;
  /** Deletes many entries (a store may delete runs of neighbouring keys at once). */
  deleteOutboxes(keys: string[]): void | Promise<void>;
  getMeta(key: string): string | undefined | Promise<string | undefined>;
  /** Sets (or with undefined, removes) a meta value. */
  setMeta(key: string, value: string | undefined): void | Promise<void>;
}

/**
 * A replica's persistent (or not) storage. Transactions are atomic: all of
 * a transaction's writes are kept, or none. They are serialized in the
 * order they were asked for: each sees every earlier one's writes (with
 * IndexedDB the functions may start together; their requests wait).
 */
export interface ReplicaStorage {
  /**
   * A name shared by every page (tab) that opens the same storage, used to
   * elect one leader among them (Web Locks) and to tell the others of each
   * change (BroadcastChannel); undefined when nothing else can open it (a
   * replica alone is always the leader).
   */
  readonly sharedName: string | undefined;
  /** Reads everything (a replica answers reads from memory). */
  load(): Promise<StorageSnapshot>;
  /** Runs `fn` in one transaction; its writes are committed when the promise it returns resolves, dropped if it rejects. */
  transaction<T>(fn: (tx: StorageTx) => Promise<T>): Promise<T>;
  /** Releases the storage (the data stays, except for the memory store's). */
  close(): Promise<void>;
}

/** A storage error, said clearly: `quota` when the browser or disk is out of space for this origin. */
export class ReplicaStorageError extends Error {
  readonly quota: boolean;
  constructor(message: string, options: { cause?: unknown; quota?: boolean } = {}) {
    super(message, { cause: options.cause });
    this.name = "ReplicaStorageError";
    this.quota = options.quota ?? false;
  }
}

/** Wraps a storage failure in a {@link ReplicaStorageError} that says what happened and what to do. */
export function storageError(err: unknown, what: string): ReplicaStorageError {
  if (err instanceof ReplicaStorageError) return err;
  const name = (err as { name?: string } | null)?.name ?? "";
  const message = (err as { message?: string } | null)?.message ?? String(err);
  if (name === "QuotaExceededError" || /quota|SQLITE_FULL|disk is full|ENOSPC/i.test(message)) {
    return new ReplicaStorageError(
      `${what}: the local storage is full (${name || "quota"}: ${message}). Nothing was saved; free space for this site ` +
        "(delete local data, or ask for persistent storage with navigator.storage.persist()) and try again",
      { cause: err, quota: true },
    );
  }
  return new ReplicaStorageError(`${what}: the local storage failed (${name ? `${name}: ` : ""}${message})`, { cause: err });
}

/** The map key of a document. */
export function docKey(database: string, id: string): string {
  return `${database}\u0000${id}`;
}

function copyDoc(row: DocRow): DocRow {
  return { ...row };
}

function copyOutbox(row: OutboxRow): OutboxRow {
  return { ...row, failed: row.failed && { ...row.failed } };
}

/** Options of {@link memoryStore}. */
export interface MemoryStoreOptions {
  /** For tests: act as a storage shared by tabs under this name (as IndexedDB is). */
  sharedName?: string;
  /** For tests: every transaction fails with this error after running `fn` (its writes are dropped) while it returns one. */
  failCommit?: () => unknown;
}

class MemoryTx implements StorageTx {
  readonly docs: Map<string, DocRow>;
  readonly outbox: Map<string, OutboxRow>;
  readonly meta: Map<string, string>;
  readonly byDoc: Map<string, Set<string>>;
  /** Undoes each write, newest first, if the transaction fails. */
  readonly log: (() => void)[] = [];
  constructor(store: MemoryStorage) {
    this.docs = store.docs;
    this.outbox = store.outbox;
    this.meta = store.meta;
    this.byDoc = store.byDoc;
  }

  getDoc(database: string, id: string): DocRow | undefined {
    const row = this.docs.get(docKey(database, id));
    return row && copyDoc(row);
  }
  putDoc(row: DocRow): void {
    const key = docKey(row.database, row.id);
    const before = this.docs.get(key);
    this.docs.set(key, copyDoc(row));
    this.log.push(() => (before ? this.docs.set(key, before) : this.docs.delete(key)));
  }
  clearDocs(database: string): void {
    for (const [key, row] of [...this.docs]) {
      if (row.database !== database) continue;
      this.docs.delete(key);
      this.log.push(() => this.docs.set(key, row));
    }
  }
  outboxOf(database: string, id: string): OutboxRow[] {
    const keys = [...(this.byDoc.get(docKey(database, id)) ?? [])].sort();
    return keys.map((key) => copyOutbox(this.outbox.get(key)!));
  }
  outboxOfDocs(database: string, ids: string[]): Map<string, OutboxRow[]> {
    const found = new Map<string, OutboxRow[]>();
    for (const id of ids) {
      const rows = this.outboxOf(database, id);
      if (rows.length > 0) found.set(id, rows);
    }
    return found;
  }
  allOutbox(): OutboxRow[] {
    return [...this.outbox.values()].sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0)).map(copyOutbox);
  }
  getOutbox(key: string): OutboxRow | undefined {
    const row = this.outbox.get(key);
    return row && copyOutbox(row);
  }
  putOutbox(row: OutboxRow): void {
    const before = this.outbox.get(row.key);
    this.#set(row.key, copyOutbox(row), before);
    this.log.push(() => this.#set(row.key, before, this.outbox.get(row.key)));
  }
  deleteOutbox(key: string): void {
    const before = this.outbox.get(key);
    if (!before) return;
    this.#set(key, undefined, before);
    this.log.push(() => this.#set(key, before, undefined));
  }
  deleteOutboxes(keys: string[]): void {
    for (const key of keys) this.deleteOutbox(key);
  }
  /** Sets (or removes) an entry, keeping the per-document index. */
  #set(key: string, row: OutboxRow | undefined, before: OutboxRow | undefined): void {
    if (before) this.byDoc.get(docKey(before.database, before.id))?.delete(key);
    if (row) {
      this.outbox.set(key, row);
      const doc = docKey(row.database, row.id);
      let keys = this.byDoc.get(doc);
      if (!keys) this.byDoc.set(doc, (keys = new Set()));
      keys.add(key);
    } else {
      this.outbox.delete(key);
    }
  }
  getMeta(key: string): string | undefined {
    return this.meta.get(key);
  }
  setMeta(key: string, value: string | undefined): void {
    const before = this.meta.get(key);
    if (value === undefined) this.meta.delete(key);
    else this.meta.set(key, value);
    this.log.push(() => (before === undefined ? this.meta.delete(key) : this.meta.set(key, before)));
  }
  rollback(): void {
    for (const undo of this.log.reverse()) undo();
  }
}

class MemoryStorage implements ReplicaStorage {
  readonly sharedName: string | undefined;
  readonly docs = new Map<string, DocRow>();
  readonly outbox = new Map<string, OutboxRow>();
  readonly meta = new Map<string, string>();
  /** Outbox keys by document. */
  readonly byDoc = new Map<string, Set<string>>();
  readonly #options: MemoryStoreOptions;
  #queue: Promise<unknown> = Promise.resolve();

  constructor(options: MemoryStoreOptions) {
    this.#options = options;
    this.sharedName = options.sharedName;
  }

  async load(): Promise<StorageSnapshot> {
    await this.#queue;
    const tx = new MemoryTx(this);
    return { docs: [...this.docs.values()].map(copyDoc), outbox: tx.allOutbox(), meta: Object.fromEntries(this.meta) };
  }

  transaction<T>(fn: (tx: StorageTx) => Promise<T>): Promise<T> {
    const run = async () => {
      const tx = new MemoryTx(this);
      try {
        const result = await fn(tx);
        const failure = this.#options.failCommit?.();
        if (failure !== undefined) throw failure;
        return result;
      } catch (err) {
        tx.rollback();
        throw err;
      }
    };
    const result = this.#queue.then(run, run);
    this.#queue = result.catch(() => undefined);
    return result;
  }

  async close(): Promise<void> {
    await this.#queue;
  }
}

/**
 * A storage in memory, for tests and for pages that need no persistence:
 * everything is lost with the page or process. Reopening a replica on the
 * same instance (after `close()`) finds what was there, like a reload.
 */
export function memoryStore(options: MemoryStoreOptions = {}): ReplicaStorage {
  return new MemoryStorage(options);
}

/** Meta keys. */
export const META_POSITION = "position";
export const META_INFLIGHT = "inflight";
