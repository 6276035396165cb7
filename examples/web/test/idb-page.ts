// Runs in Chromium (bundled by test/replica-idb.mjs): the IndexedDB store's
// conformance checks (the same as clients/web/test/storage.test.ts runs on
// the memory and SQLite stores) and the replica's benchmarks in a browser.
import {
  createAgsyncTransport,
  deleteIndexedDbStore,
  indexedDbStore,
  openReplica,
  type OutboxRow,
  type Replica,
  type ReplicaStorage,
} from "@agsync/web";

function assert(ok: unknown, what: string): asserts ok {
  if (!ok) throw new Error(`check failed: ${what}`);
}
const same = (a: unknown, b: unknown) => JSON.stringify(a, (_k, v) => (typeof v === "bigint" ? `${v}n` : v)) === JSON.stringify(b, (_k, v) => (typeof v === "bigint" ? `${v}n` : v));
let stores = 0;
const fresh = () => `conformance-${Date.now()}-${stores++}`;

function entry(key: string, id: string, extra: Partial<OutboxRow> = {}): OutboxRow {
  return { key, requestId: `r-${key}`, database: "db", id, op: "put", body: { k: key }, baseRev: null, baseBody: null, createdAt: 1, ...extra };
}

async function conformance(): Promise<string[]> {
  const passed: string[] = [];
  {
    const name = fresh();
    const store: ReplicaStorage = indexedDbStore(name);
    await store.transaction(async (tx) => {
      await tx.putDoc({ database: "db", id: "a", rev: "1-x", seq: 9007199254740993n, deleted: false, body: { n: 1, nested: { a: [1, "x", null] } } });
      await tx.putDoc({ database: "db", id: "b", rev: "2-y", seq: 2n, deleted: true, body: null });
      await tx.putDoc({ database: "other", id: "a", rev: "1-z", seq: 3n, deleted: false, body: {} });
    });
    const a = await store.transaction(async (tx) => tx.getDoc("db", "a"));
    assert(same(a, { database: "db", id: "a", rev: "1-x", seq: 9007199254740993n, deleted: false, body: { n: 1, nested: { a: [1, "x", null] } } }), "a document round-trips");
    await store.transaction(async (tx) => tx.clearDocs("db"));
    await store.close();
    const again = indexedDbStore(name);
    const { docs } = await again.load();
    assert(same(docs.map((d) => [d.database, d.id]), [["other", "a"]]), "clearDocs clears one database only, durably");
    await again.close();
    passed.push("documents (64-bit seqs, null bodies), clearing one database");
  }
  {
    // Many documents in one transaction are written as pages; a later single write wins by seq; clear clears both.
    const name = fresh();
    const store = indexedDbStore(name);
    await store.transaction(async (tx) => {
      for (let i = 0; i < 2500; i++) await tx.putDoc({ database: "db", id: `d${i}`, rev: "1-a", seq: BigInt(i + 1), deleted: false, body: { i } });
    });
    await store.transaction(async (tx) => {
      await tx.putDoc({ database: "db", id: "d7", rev: "2-b", seq: 5000n, deleted: false, body: { i: 7, again: true } });
      await tx.putDoc({ database: "db", id: "d8", rev: "2-c", seq: 5001n, deleted: true, body: null });
    });
    assert(same(await store.transaction(async (tx) => tx.getDoc("db", "d7")), { database: "db", id: "d7", rev: "2-b", seq: 5000n, deleted: false, body: { i: 7, again: true } }), "getDoc: the newest copy");
    await store.close();
    let again = indexedDbStore(name);
    let { docs } = await again.load();
    assert(docs.length === 2500, `2500 documents read back, not ${docs.length}`);
    const byId = new Map(docs.map((d) => [d.id, d]));
    assert(byId.get("d7")?.rev === "2-b" && byId.get("d8")?.deleted === true && byId.get("d9")?.rev === "1-a", "the newest copy of each");
    // Rewriting them all (a reload) twice over makes the old pages garbage: reading compacts them.
    for (let round = 0; round < 2; round++) {
      await again.transaction(async (tx) => {
        for (let i = 0; i < 2500; i++) await tx.putDoc({ database: "db", id: `d${i}`, rev: `${round + 3}-x`, seq: BigInt(10_000 * (round + 1) + i), deleted: false, body: { i, round } });
      });
    }
    await again.close();
    again = indexedDbStore(name);
    ({ docs } = await again.load());
    assert(docs.length === 2500 && docs.every((d) => d.rev === "4-x"), "the last round wins");
    ({ docs } = await again.load());
    assert(docs.length === 2500 && docs.every((d) => d.rev === "4-x"), "the same after compaction");
    await again.transaction(async (tx) => tx.clearDocs("db"));
    assert((await again.load()).docs.length === 0, "cleared");
    await again.close();
    passed.push("many documents at once (pages), single writes over them, compaction, clearing");
  }
  {
    const name = fresh();
    const store = indexedDbStore(name);
    await store.transaction(async (tx) => {
      await tx.putOutbox(entry("k3", "a"));
      await tx.putOutbox(entry("k1", "b"));
      await tx.putOutbox(entry("k2", "a", { op: "delete", body: null, failed: { reason: "invalid", message: "m" } }));
    });
    await store.transaction(async (tx) => {
      assert(same((await tx.outboxOf("db", "a")).map((r) => r.key), ["k2", "k3"]), "outboxOf in key order");
      assert(same((await tx.allOutbox()).map((r) => r.key), ["k1", "k2", "k3"]), "allOutbox in key order");
      const many = await tx.outboxOfDocs("db", ["a", "b", "none"]);
      assert(same([...many].map(([id, rows]) => [id, rows.map((r) => r.key)]).sort(), [["a", ["k2", "k3"]], ["b", ["k1"]]]), "outboxOfDocs");
      await tx.putOutbox(entry("k1", "b", { baseRev: "1-abc", requestId: "replaced" }));
      await tx.deleteOutbox("k3");
    });
    await store.close();
    const again = indexedDbStore(name);
    const { outbox } = await again.load();
    assert(same(outbox.map((r) => [r.key, r.requestId, r.baseRev]), [["k1", "replaced", "1-abc"], ["k2", "r-k2", null]]), "replace and delete by key, durably");
    await again.close();
    passed.push("the outbox in key order, per document too; replace; delete");
  }
  {
    const store = indexedDbStore(fresh());
    let threw = false;
    try {
      await store.transaction(async (tx) => {
        await tx.setMeta("position", "1");
        await tx.putOutbox(entry("k1", "a"));
        throw new Error("boom");
      });
    } catch (err) {
      threw = (err as Error).message === "boom";
    }
    assert(threw, "the function's error comes out");
    const snapshot = await store.load();
    assert(same([snapshot.outbox, snapshot.meta], [[], {}]), "a failed transaction writes nothing");
    await store.close();
    passed.push("a transaction whose function throws writes nothing");
  }
  {
    const store = indexedDbStore(fresh());
    const seen: string[] = [];
    await Promise.all(
      ["a", "b", "c"].map((name) =>
        store.transaction(async (tx) => {
          const before = Number((await tx.getMeta("n")) ?? 0);
          await tx.setMeta("n", String(before + 1));
          seen.push(`${name}:${before}`);
        }),
      ),
    );
    assert(same(seen, ["a:0", "b:1", "c:2"]), `one after another, in order: ${seen}`);
    assert((await store.load()).meta.n === "3", "all three counted");
    await store.close();
    passed.push("transactions one after another, in order");
  }
  return passed;
}

let offline = false;
function transport(serverUrl: string) {
  return createAgsyncTransport({
    baseUrl: serverUrl,
    fetch: (input, init) => (offline ? Promise.reject(new TypeError("Failed to fetch (offline)")) : fetch(input, init)),
  });
}

/** Times each transaction of a store (for IDB_PROFILE runs). */
const txTimes: string[] = [];
function timed(inner: ReplicaStorage): ReplicaStorage {
  return {
    sharedName: inner.sharedName,
    load: () => inner.load(),
    close: () => inner.close(),
    transaction: async (fn) => {
      const t = performance.now();
      let ops = 0;
      try {
        return await inner.transaction((tx) => {
          const counting = new Proxy(tx, {
            get: (target, key) => {
              ops++;
              const value = (target as unknown as Record<string | symbol, unknown>)[key];
              return typeof value === "function" ? value.bind(target) : value;
            },
          });
          return fn(counting);
        });
      } finally {
        txTimes.push(`${Math.round(performance.now() - t)}ms/${ops}`);
      }
    },
  };
}

async function open(serverUrl: string, database: string): Promise<Replica> {
  const name = `bench-${database}-${Date.now()}`;
  await deleteIndexedDbStore(name);
  return openReplica({ transport: transport(serverUrl), databases: [database], store: timed(indexedDbStore(name)), backoff: { initialMs: 20, maxMs: 200 } });
}

async function writeLatency(serverUrl: string, database: string, n: number) {
  const replica = await open(serverUrl, database);
  await replica.whenSynced();
  let heard = 0;
  replica.subscribe((changes) => (heard += changes.length));
  const visible: number[] = [];
  const notified: number[] = [];
  const stored: number[] = [];
  const body = { title: "x".repeat(200), done: false, n: 0 };
  for (let i = 0; i < n; i++) {
    const id = `d${i % 200}`;
    const t0 = performance.now();
    const before = heard;
    const saving = replica.put(database, id, { ...body, n: i });
    assert(replica.get(database, id)?.body.n === i, "visible at once");
    visible.push(performance.now() - t0);
    await Promise.resolve();
    await Promise.resolve();
    if (heard === before) await new Promise((r) => setTimeout(r, 0));
    notified.push(performance.now() - t0);
    await saving;
    stored.push(performance.now() - t0);
  }
  await replica.whenSynced();
  await replica.close();
  return { visible, notified, stored };
}

async function upload(serverUrl: string, database: string, n: number, docs: number) {
  const replica = await open(serverUrl, database);
  await replica.whenSynced();
  offline = true;
  for (let i = 0; i < n; i++) await replica.put(database, `d${i % docs}`, { title: `todo ${i}`, done: i % 2 === 0, n: i });
  const t0 = performance.now();
  offline = false;
  await replica.whenSynced();
  const ms = performance.now() - t0;
  await replica.close();
  return { ms, txs: txTimes.splice(0).slice(-80) };
}

async function initialLoad(serverUrl: string, database: string, expected: number) {
  const name = `load-${database}-${Date.now()}`;
  await deleteIndexedDbStore(name);
  const inner = indexedDbStore(name);
  const txTimes: number[] = [];
  const timed: ReplicaStorage = {
    sharedName: inner.sharedName,
    load: () => inner.load(),
    close: () => inner.close(),
    transaction: async (fn) => {
      const t = performance.now();
      try {
        return await inner.transaction(fn);
      } finally {
        txTimes.push(performance.now() - t);
      }
    },
  };
  const t0 = performance.now();
  const replica = await openReplica({ transport: transport(serverUrl), databases: [database], store: timed, pageSize: 4000 });
  await replica.whenSynced();
  const ms = performance.now() - t0;
  const count = replica.all(database).length;
  await replica.close();
  assert(count === expected, `${count} documents loaded, ${expected} expected`);
  // And reading them back from IndexedDB (a reload).
  const t1 = performance.now();
  const again = await openReplica({ transport: transport(serverUrl), databases: [database], store: indexedDbStore(name) });
  const reopenMs = performance.now() - t1;
  assert(again.all(database).length === expected, "all there after a reopen");
  await again.close();
  return { ms, reopenMs, txMs: txTimes.map(Math.round) };
}

(window as unknown as { bench: unknown }).bench = { conformance, writeLatency, upload, initialLoad };
document.body.dataset.ready = "true";
