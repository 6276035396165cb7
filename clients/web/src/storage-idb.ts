/**
 * The replica's storage in a browser: one IndexedDB database (through Jake
 * Archibald's `idb`), shared by every tab of the origin that opens the same
 * name. Each replica change is one IndexedDB transaction over the object
 * stores, so an edit and its outbox entry are written together or not at
 * all. IndexedDB runs transactions over the same stores one after another,
 * across tabs too, in the order they were created.
 *
 * Documents written many at a time (a page of Changes, an upload's
 * settlement) go into `pages`: one record per up to 1000 documents (a JSON
 * text), because IndexedDB's cost is per record: a record per document
 * loads a large database at a few thousand documents a second, pages at
 * tens of thousands. Documents written a few at a time go into `docs`, one
 * record each. A document may be in both: reading takes the copy with the
 * highest seq. Pages whose copies are mostly superseded are compacted when
 * the store is read whole (when a replica opens).
 *
 * @module
 */
import { openDB, type DBSchema, type IDBPDatabase, type IDBPTransaction } from "idb";
import type { DocRow, OutboxRow, ReplicaStorage, StorageSnapshot, StorageTx } from "./storage.js";

/** A page: documents as [id, rev, seq, deleted, body] (seq as a decimal string), as JSON text. */
type PageRow = [string, string, string, boolean, unknown];

interface ReplicaDB extends DBSchema {
  docs: { key: [string, string]; value: DocRow };
  pages: { key: [string, string]; value: string };
  outbox: { key: string; value: OutboxRow; indexes: { doc: [string, string] } };
  meta: { key: string; value: string };
}

type Stores = ("docs" | "pages" | "outbox" | "meta")[];
type Tx = IDBPTransaction<ReplicaDB, Stores, "readwrite">;
const STORES: Stores = ["docs", "pages", "outbox", "meta"];

/** From this many documents in one transaction on, they are written as pages. */
const PAGE_FROM = 64;
const PAGE_SIZE = 1000;

/** Options of {@link indexedDbStore}. */
export interface IndexedDbStoreOptions {
  /**
   * IndexedDB's transaction durability: "strict" waits for the disk (an OS
   * crash loses nothing committed), "relaxed" only for the OS (a browser
   * crash loses nothing, a power cut may), "default" is the browser's
   * choice. Default "default".
   */
  durability?: "default" | "strict" | "relaxed";
}

/** Every key [database, *] of a store: arrays sort after strings. */
function databaseRange(database: string): IDBKeyRange {
  return IDBKeyRange.bound([database], [database, []]);
}

let pageCounter = 0;
function pageKey(): string {
  // Unique (order does not matter: reading keeps the highest seq per document).
  return `${Date.now().toString(36)}-${(pageCounter++).toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

function toPage(rows: DocRow[]): string {
  return JSON.stringify(rows.map((r): PageRow => [r.id, r.rev, r.seq.toString(), r.deleted, r.body]));
}

function fromPage(database: string, text: string): DocRow[] {
  return (JSON.parse(text) as PageRow[]).map(([id, rev, seq, deleted, body]) => ({
    database,
    id,
    rev,
    seq: BigInt(seq),
    deleted,
    body: body as DocRow["body"],
  }));
}

/** Keeps, per document, the row with the highest seq. */
function newest(into: Map<string, DocRow>, row: DocRow): void {
  const key = `${row.database}\u0000${row.id}`;
  const have = into.get(key);
  if (!have || have.seq < row.seq) into.set(key, row);
}

class IdbTx implements StorageTx {
  readonly #tx: Tx;
  /** Documents written by this transaction, written out at its end. */
  readonly #docs = new Map<string, DocRow>();
  constructor(tx: Tx) {
    this.#tx = tx;
  }
  async getDoc(database: string, id: string) {
    const mine = this.#docs.get(`${database}\u0000${id}`);
    if (mine) return mine;
    // The slow path (no caller of the replica needs it on a hot path): the
    // record, and every page of the database.
    const found = new Map<string, DocRow>();
    const row = await this.#tx.objectStore("docs").get([database, id]);
    if (row) newest(found, row);
    for (const text of await this.#tx.objectStore("pages").getAll(databaseRange(database))) {
      for (const r of fromPage(database, text)) if (r.id === id) newest(found, r);
    }
    return found.get(`${database}\u0000${id}`);
  }
  putDoc(row: DocRow) {
    this.#docs.set(`${row.database}\u0000${row.id}`, row);
  }
  async clearDocs(database: string) {
    for (const key of [...this.#docs.keys()]) if (this.#docs.get(key)!.database === database) this.#docs.delete(key);
    await Promise.all([this.#tx.objectStore("docs").delete(databaseRange(database)), this.#tx.objectStore("pages").delete(databaseRange(database))]);
  }
  outboxOf(database: string, id: string) {
    return this.#tx.objectStore("outbox").index("doc").getAll(IDBKeyRange.only([database, id]));
  }
  /** One read of the whole outbox (cheaper in IndexedDB than a read per document). */
  async outboxOfDocs(database: string, ids: string[]) {
    const wanted = new Set(ids);
    const found = new Map<string, OutboxRow[]>();
    for (const row of await this.#tx.objectStore("outbox").getAll()) {
      if (row.database !== database || !wanted.has(row.id)) continue;
      const rows = found.get(row.id);
      if (rows) rows.push(row);
      else found.set(row.id, [row]);
    }
    return found;
  }
  allOutbox() {
    return this.#tx.objectStore("outbox").getAll();
  }
  getOutbox(key: string) {
    return this.#tx.objectStore("outbox").get(key);
  }
  async putOutbox(row: OutboxRow) {
    await this.#tx.objectStore("outbox").put(row);
  }
  async deleteOutbox(key: string) {
    await this.#tx.objectStore("outbox").delete(key);
  }
  /** Deletes runs of neighbouring keys with one range each (after one read of the keys between). */
  async deleteOutboxes(keys: string[]) {
    if (keys.length === 0) return;
    const store = this.#tx.objectStore("outbox");
    const sorted = [...keys].sort();
    const present = await store.getAllKeys(IDBKeyRange.bound(sorted[0]!, sorted[sorted.length - 1]!));
    const wanted = new Set(sorted);
    const deletes: Promise<unknown>[] = [];
    let start = -1;
    const run = (from: number, to: number) =>
      deletes.push(store.delete(from === to ? present[from]! : IDBKeyRange.bound(present[from]!, present[to]!)));
    present.forEach((key, i) => {
      if (wanted.has(key)) {
        if (start < 0) start = i;
      } else if (start >= 0) {
        run(start, i - 1);
        start = -1;
      }
    });
    if (start >= 0) run(start, present.length - 1);
    await Promise.all(deletes);
  }
  getMeta(key: string) {
    return this.#tx.objectStore("meta").get(key);
  }
  async setMeta(key: string, value: string | undefined) {
    if (value === undefined) await this.#tx.objectStore("meta").delete(key);
    else await this.#tx.objectStore("meta").put(value, key);
  }
  /** Writes the documents of this transaction: a record each if few, pages if many. */
  async flush(): Promise<void> {
    const rows = [...this.#docs.values()];
    this.#docs.clear();
    const writes: Promise<unknown>[] = [];
    if (rows.length < PAGE_FROM) {
      for (const row of rows) writes.push(this.#tx.objectStore("docs").put(row));
    } else {
      const byDatabase = new Map<string, DocRow[]>();
      for (const row of rows) {
        const list = byDatabase.get(row.database);
        if (list) list.push(row);
        else byDatabase.set(row.database, [row]);
      }
      for (const [database, list] of byDatabase) {
        for (let i = 0; i < list.length; i += PAGE_SIZE) {
          writes.push(this.#tx.objectStore("pages").put(toPage(list.slice(i, i + PAGE_SIZE)), [database, pageKey()]));
        }
      }
    }
    await Promise.all(writes);
  }
}

class IndexedDbStorage implements ReplicaStorage {
  readonly sharedName: string;
  readonly #durability: IDBTransactionDurability;
  readonly #db: Promise<IDBPDatabase<ReplicaDB>>;

  constructor(name: string, options: IndexedDbStoreOptions) {
    this.sharedName = name;
    this.#durability = options.durability ?? "default";
    this.#db = openDB<ReplicaDB>(name, 2, {
      upgrade(db) {
        const has = (store: string) => db.objectStoreNames.contains(store as "docs");
        if (!has("docs")) db.createObjectStore("docs", { keyPath: ["database", "id"] });
        if (!has("pages")) db.createObjectStore("pages");
        if (!has("outbox")) db.createObjectStore("outbox", { keyPath: "key" }).createIndex("doc", ["database", "id"]);
        if (!has("meta")) db.createObjectStore("meta");
      },
    });
  }

  /** Reads everything; rewrites the pages of a database whose copies are mostly superseded. */
  async load(): Promise<StorageSnapshot> {
    const db = await this.#db;
    const tx = db.transaction(STORES, "readwrite", { durability: this.#durability });
    const [docs, pageKeys, pages, outbox, keys, values] = await Promise.all([
      tx.objectStore("docs").getAll(),
      tx.objectStore("pages").getAllKeys(),
      tx.objectStore("pages").getAll(),
      tx.objectStore("outbox").getAll(),
      tx.objectStore("meta").getAllKeys(),
      tx.objectStore("meta").getAll(),
    ]);
    const live = new Map<string, DocRow>();
    const copies = new Map<string, number>();
    pageKeys.forEach(([database], i) => {
      const rows = fromPage(database, pages[i]!);
      copies.set(database, (copies.get(database) ?? 0) + rows.length);
      for (const row of rows) newest(live, row);
    });
    for (const row of docs) {
      newest(live, row);
      copies.set(row.database, (copies.get(row.database) ?? 0) + 1);
    }
    const writes: Promise<unknown>[] = [];
    for (const [database, count] of copies) {
      const rows = [...live.values()].filter((r) => r.database === database);
      if (count < 2 * PAGE_SIZE || count < 2 * rows.length) continue;
      // Compaction: the database's live documents as fresh pages, in the same transaction.
      writes.push(tx.objectStore("docs").delete(databaseRange(database)), tx.objectStore("pages").delete(databaseRange(database)));
      for (let i = 0; i < rows.length; i += PAGE_SIZE) {
        writes.push(tx.objectStore("pages").put(toPage(rows.slice(i, i + PAGE_SIZE)), [database, pageKey()]));
      }
    }
    await Promise.all(writes);
    await tx.done;
    return { docs: [...live.values()], outbox, meta: Object.fromEntries(keys.map((key, i) => [key, values[i]!])) };
  }

  async transaction<T>(fn: (tx: StorageTx) => Promise<T>): Promise<T> {
    const db = await this.#db;
    const tx = db.transaction(STORES, "readwrite", { durability: this.#durability });
    const itx = new IdbTx(tx);
    let result: T;
    try {
      result = await fn(itx);
      await itx.flush();
    } catch (err) {
      try {
        tx.abort();
      } catch {
        // already finished or aborted
      }
      await tx.done.catch(() => undefined);
      throw err;
    }
    await tx.done;
    return result;
  }

  async close(): Promise<void> {
    (await this.#db).close();
  }
}

/**
 * A storage in IndexedDB, in the database `name` (one per replica: the same
 * name in another tab is the same replica, and the tabs elect one leader).
 */
export function indexedDbStore(name: string, options: IndexedDbStoreOptions = {}): ReplicaStorage {
  if (typeof indexedDB === "undefined") throw new Error("indexedDbStore: this environment has no IndexedDB (in Node, use sqliteStore from @agsync/web/sqlite)");
  return new IndexedDbStorage(name, options);
}

/** Deletes a replica's IndexedDB database (close its replicas first). */
export async function deleteIndexedDbStore(name: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const req = indexedDB.deleteDatabase(name);
    req.onsuccess = () => resolve();
    req.onerror = () => reject(req.error);
    req.onblocked = () => resolve();
  });
}
