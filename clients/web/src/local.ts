/**
 * A replica's local state: the storage, and a copy of it in memory that
 * every read answers from. Each change goes through {@link LocalState.transaction},
 * which records what the transaction wrote as a list of {@link StorageOp}s
 * and, once the storage committed, applies that list to the memory copy;
 * other tabs of the same storage receive the same list and apply it too.
 *
 * The visible document is computed here: the server's state with the
 * document's pending edits replayed on top (each edit's changes, relative to
 * the body it started from, laid over what is below it). This module does
 * not talk to the server and decides no conflict.
 *
 * @module
 */
import type { JsonObject } from "@bufbuild/protobuf";
import { jsonEqual, mergeJson } from "./resolve.js";
import { storageError, type DocRow, type OutboxRow, type ReplicaStorage, type StorageTx } from "./storage.js";

/** One write of a transaction, as it is applied to memory and sent to other tabs. */
export type StorageOp =
  | { op: "doc"; row: DocRow }
  | { op: "clear"; database: string }
  | { op: "outbox"; row: OutboxRow }
  | { op: "unqueue"; key: string }
  | { op: "meta"; key: string; value: string | undefined };

/** A document as the app sees it: the server's state with the pending local edits on top. */
export interface ReplicaDocument {
  database: string;
  id: string;
  /** The body. Shared with the replica: treat it as read-only. */
  body: JsonObject;
  /** The server revision the local state is based on; "" when the server has no such document (yet). */
  rev: string;
  /** The seq of that revision; 0 when none. */
  seq: bigint;
  /** True while local edits of this document are not on the server yet (Firestore's hasPendingWrites). */
  pending: boolean;
  /** True when one of those edits was rejected and kept by the app (see `onRejected`): it is not sent until retried. */
  failed: boolean;
}

/** What changed in memory. */
export interface LocalChanges {
  /** Documents whose view may have changed, as [database, id]. */
  docs: [string, string][];
  /** The outbox changed (pending counts). */
  outbox: boolean;
  /** Meta keys that changed. */
  meta: string[];
}

/** Names of the errors IndexedDB and better-sqlite3 raise. */
const STORAGE_ERRORS = new Set([
  "QuotaExceededError",
  "DataError",
  "DataCloneError",
  "ConstraintError",
  "InvalidStateError",
  "TransactionInactiveError",
  "UnknownError",
  "VersionError",
  "SqliteError",
]);

function compareKeys(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Inserts `key` into the sorted array (no duplicates). */
function insertSorted(keys: string[], key: string): void {
  const last = keys[keys.length - 1];
  if (last === undefined || last < key) {
    keys.push(key);
    return;
  }
  let lo = 0;
  let hi = keys.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (keys[mid]! < key) lo = mid + 1;
    else hi = mid;
  }
  if (keys[lo] !== key) keys.splice(lo, 0, key);
}

function removeSorted(keys: string[], key: string): void {
  if (keys[0] === key) {
    keys.shift();
    return;
  }
  let lo = 0;
  let hi = keys.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (keys[mid]! < key) lo = mid + 1;
    else hi = mid;
  }
  if (keys[lo] === key) keys.splice(lo, 1);
}

/** A storage transaction that records its writes. */
class RecordingTx implements StorageTx {
  readonly ops: StorageOp[] = [];
  readonly #tx: StorageTx;
  constructor(tx: StorageTx) {
    this.#tx = tx;
  }
  getDoc(database: string, id: string) {
    return this.#tx.getDoc(database, id);
  }
  putDoc(row: DocRow) {
    this.ops.push({ op: "doc", row });
    return this.#tx.putDoc(row);
  }
  clearDocs(database: string) {
    this.ops.push({ op: "clear", database });
    return this.#tx.clearDocs(database);
  }
  outboxOf(database: string, id: string) {
    return this.#tx.outboxOf(database, id);
  }
  outboxOfDocs(database: string, ids: string[]) {
    return this.#tx.outboxOfDocs(database, ids);
  }
  allOutbox() {
    return this.#tx.allOutbox();
  }
  getOutbox(key: string) {
    return this.#tx.getOutbox(key);
  }
  putOutbox(row: OutboxRow) {
    this.ops.push({ op: "outbox", row });
    return this.#tx.putOutbox(row);
  }
  deleteOutbox(key: string) {
    this.ops.push({ op: "unqueue", key });
    return this.#tx.deleteOutbox(key);
  }
  deleteOutboxes(keys: string[]) {
    for (const key of keys) this.ops.push({ op: "unqueue", key });
    return this.#tx.deleteOutboxes(keys);
  }
  getMeta(key: string) {
    return this.#tx.getMeta(key);
  }
  setMeta(key: string, value: string | undefined) {
    this.ops.push({ op: "meta", key, value });
    return this.#tx.setMeta(key, value);
  }
}

/** The storage and its copy in memory. */
export class LocalState {
  readonly storage: ReplicaStorage;
  /** database -> id -> the server's state. */
  readonly #docs = new Map<string, Map<string, DocRow>>();
  readonly #outbox = new Map<string, OutboxRow>();
  /** Outbox keys in order. */
  readonly #order: string[] = [];
  /** database -> id -> that document's outbox keys, in order. */
  readonly #pending = new Map<string, Map<string, string[]>>();
  /** Outbox keys removed: a late "add" of one of them from another tab is ignored. */
  readonly #removed = new Set<string>();
  readonly #meta = new Map<string, string>();
  /** Memoized views (null: no visible document), dropped when a document changes. */
  readonly #views = new Map<string, Map<string, ReplicaDocument | null>>();
  #failed = 0;
  readonly #listeners = new Set<(changes: LocalChanges) => void>();
  /** Called with the ops of each transaction this state committed (to tell other tabs). */
  onCommitted: ((ops: StorageOp[]) => void) | undefined;
  #serial: Promise<unknown> = Promise.resolve();

  constructor(storage: ReplicaStorage) {
    this.storage = storage;
  }

  /** (Re)reads everything from the storage. */
  async load(): Promise<void> {
    let snapshot;
    try {
      snapshot = await this.storage.load();
    } catch (err) {
      throw storageError(err, "cannot read the local replica");
    }
    const changed: [string, string][] = [];
    for (const [database, docs] of this.#docs) for (const id of docs.keys()) changed.push([database, id]);
    for (const row of this.#outbox.values()) changed.push([row.database, row.id]);
    this.#docs.clear();
    this.#outbox.clear();
    this.#order.length = 0;
    this.#pending.clear();
    this.#meta.clear();
    this.#views.clear();
    this.#failed = 0;
    for (const row of snapshot.docs) this.#setDoc(row);
    for (const row of snapshot.outbox) this.#addOutbox(row);
    for (const [key, value] of Object.entries(snapshot.meta)) this.#meta.set(key, value);
    for (const row of snapshot.docs) changed.push([row.database, row.id]);
    for (const row of snapshot.outbox) changed.push([row.database, row.id]);
    this.#emit({ docs: changed, outbox: true, meta: Object.keys(snapshot.meta) });
  }

  /** Listens to every change of the memory copy; returns the unsubscribe function. */
  listen(listener: (changes: LocalChanges) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /**
   * Runs `fn` in one storage transaction, then applies what it wrote to
   * memory (and hands it to {@link onCommitted}). Storage failures come out
   * as {@link ReplicaStorageError}s naming `what`.
   */
  async transaction<T>(what: string, fn: (tx: StorageTx) => Promise<T>): Promise<T> {
    let ops: StorageOp[] = [];
    let result: T;
    let ownError = false;
    try {
      result = await this.storage.transaction(async (tx) => {
        const recording = new RecordingTx(tx);
        try {
          const value = await fn(recording);
          ops = recording.ops;
          return value;
        } catch (err) {
          ownError = true;
          throw err;
        }
      });
    } catch (err) {
      // An error of the caller's own logic goes out as it is; one the
      // storage raised (at a request or at commit) is said as such.
      if (ownError && !STORAGE_ERRORS.has((err as { name?: string } | null)?.name ?? "")) throw err;
      throw storageError(err, what);
    }
    if (ops.length > 0) {
      this.apply(ops);
      this.onCommitted?.(ops);
    }
    return result;
  }

  /**
   * Runs `fn` after every earlier `serial` call finished: the writers of
   * document rows go one at a time, so each decides from a memory copy
   * that holds every earlier one's result.
   */
  serial<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.#serial.then(fn, fn);
    this.#serial = result.catch(() => undefined);
    return result;
  }

  /** Applies ops (of this tab's transactions, of another tab's, or optimistic ones) to memory. */
  apply(ops: StorageOp[]): void {
    const changes: LocalChanges = { docs: [], outbox: false, meta: [] };
    for (const op of ops) {
      switch (op.op) {
        case "doc":
          this.#setDoc(op.row);
          changes.docs.push([op.row.database, op.row.id]);
          break;
        case "clear": {
          const docs = this.#docs.get(op.database);
          if (docs) for (const id of docs.keys()) changes.docs.push([op.database, id]);
          this.#docs.delete(op.database);
          this.#views.delete(op.database);
          break;
        }
        case "outbox": {
          if (this.#removed.has(op.row.key)) break;
          const before = this.#outbox.get(op.row.key);
          if (before) this.#removeOutbox(before.key, false);
          this.#addOutbox(op.row);
          if (before && (before.database !== op.row.database || before.id !== op.row.id)) changes.docs.push([before.database, before.id]);
          changes.docs.push([op.row.database, op.row.id]);
          changes.outbox = true;
          break;
        }
        case "unqueue": {
          const before = this.#outbox.get(op.key);
          this.#removed.add(op.key);
          if (!before) break;
          this.#removeOutbox(op.key, true);
          changes.docs.push([before.database, before.id]);
          changes.outbox = true;
          break;
        }
        case "meta":
          if (op.value === undefined) this.#meta.delete(op.key);
          else this.#meta.set(op.key, op.value);
          changes.meta.push(op.key);
          break;
      }
    }
    for (const [database, id] of changes.docs) this.#views.get(database)?.delete(id);
    this.#emit(changes);
  }

  /** Takes back an optimistic outbox entry whose transaction failed. */
  forget(key: string): void {
    const before = this.#outbox.get(key);
    if (!before) return;
    this.#removeOutbox(key, false);
    this.#views.get(before.database)?.delete(before.id);
    this.#emit({ docs: [[before.database, before.id]], outbox: true, meta: [] });
  }

  #emit(changes: LocalChanges): void {
    for (const listener of this.#listeners) listener(changes);
  }

  #setDoc(row: DocRow): void {
    let docs = this.#docs.get(row.database);
    if (!docs) this.#docs.set(row.database, (docs = new Map()));
    docs.set(row.id, row);
  }

  #addOutbox(row: OutboxRow): void {
    this.#outbox.set(row.key, row);
    insertSorted(this.#order, row.key);
    let byId = this.#pending.get(row.database);
    if (!byId) this.#pending.set(row.database, (byId = new Map()));
    let keys = byId.get(row.id);
    if (!keys) byId.set(row.id, (keys = []));
    insertSorted(keys, row.key);
    if (row.failed) this.#failed += 1;
  }

  #removeOutbox(key: string, removed: boolean): void {
    const row = this.#outbox.get(key);
    if (!row) return;
    this.#outbox.delete(key);
    if (removed) this.#removed.add(key);
    removeSorted(this.#order, key);
    const byId = this.#pending.get(row.database);
    const keys = byId?.get(row.id);
    if (keys) {
      removeSorted(keys, key);
      if (keys.length === 0) byId!.delete(row.id);
    }
    if (row.failed) this.#failed -= 1;
  }

  // ---- reads -------------------------------------------------------------------

  /** The server's state of a document, as last seen. */
  doc(database: string, id: string): DocRow | undefined {
    return this.#docs.get(database)?.get(id);
  }

  /** The pending edits of a document, in order. */
  pendingOf(database: string, id: string): OutboxRow[] {
    return (this.#pending.get(database)?.get(id) ?? []).map((key) => this.#outbox.get(key)!);
  }

  outboxEntry(key: string): OutboxRow | undefined {
    return this.#outbox.get(key);
  }

  /** The outbox, in order. */
  *outbox(): IterableIterator<OutboxRow> {
    for (const key of [...this.#order]) {
      const row = this.#outbox.get(key);
      if (row) yield row;
    }
  }

  /** The last outbox key, if any. */
  get lastOutboxKey(): string | undefined {
    return this.#order[this.#order.length - 1];
  }

  get pendingCount(): number {
    return this.#outbox.size;
  }

  get failedCount(): number {
    return this.#failed;
  }

  meta(key: string): string | undefined {
    return this.#meta.get(key);
  }

  /** The document as the app sees it (undefined: none, or deleted locally or on the server). */
  view(database: string, id: string): ReplicaDocument | undefined {
    let views = this.#views.get(database);
    const memo = views?.get(id);
    if (memo !== undefined) return memo ?? undefined;
    const row = this.#docs.get(database)?.get(id);
    const keys = this.#pending.get(database)?.get(id);
    let doc: ReplicaDocument | undefined;
    if (!keys) {
      doc = row && !row.deleted && row.body ? { database, id, body: row.body, rev: row.rev, seq: row.seq, pending: false, failed: false } : undefined;
    } else {
      let body: JsonObject | undefined = row && !row.deleted && row.body ? row.body : undefined;
      let failed = false;
      for (const key of keys) {
        const edit = this.#outbox.get(key)!;
        if (edit.failed) failed = true;
        if (edit.op === "delete") body = undefined;
        else if (body === undefined) body = edit.body!;
        else body = mergeJson(edit.baseBody ?? {}, edit.body!, body, "local") as JsonObject;
      }
      doc = body && { database, id, body, rev: row?.rev ?? "", seq: row?.seq ?? 0n, pending: true, failed };
    }
    if (!views) this.#views.set(database, (views = new Map()));
    views.set(id, doc ?? null);
    return doc;
  }

  /** Every visible document of a database, by id. */
  viewAll(database: string): ReplicaDocument[] {
    const ids = new Set<string>(this.#docs.get(database)?.keys() ?? []);
    for (const id of this.#pending.get(database)?.keys() ?? []) ids.add(id);
    const docs: ReplicaDocument[] = [];
    for (const id of ids) {
      const doc = this.view(database, id);
      if (doc) docs.push(doc);
    }
    return docs.sort((a, b) => compareKeys(a.id, b.id));
  }

  /** Whether two views differ for the app. */
  static sameView(a: ReplicaDocument | undefined, b: ReplicaDocument | undefined): boolean {
    if (a === b) return true;
    if (!a || !b) return false;
    return a.rev === b.rev && a.pending === b.pending && a.failed === b.failed && jsonEqual(a.body, b.body);
  }
}
