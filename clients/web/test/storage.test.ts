// The replica storages behind one interface: the same conformance checks
// run against the memory store and the SQLite store (the IndexedDB store
// runs them in Chromium: examples/web/test/replica-idb.mjs).
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { memoryStore, type OutboxRow, type ReplicaStorage } from "../src/storage.js";
import { sqliteStore } from "../src/storage-sqlite.js";

const dir = mkdtempSync(join(tmpdir(), "agsync-web-storage-"));
after(() => rmSync(dir, { recursive: true, force: true }));

function entry(key: string, id: string, extra: Partial<OutboxRow> = {}): OutboxRow {
  return { key, requestId: `r-${key}`, database: "db", id, op: "put", body: { k: key }, baseRev: null, baseBody: null, createdAt: 1, ...extra };
}

/** Checks every storage must pass; `reopen` gives a new handle on the same data (a reload). */
function conformance(name: string, make: () => { store: ReplicaStorage; reopen: () => ReplicaStorage }) {
  describe(`${name} storage`, () => {
    it("keeps documents (64-bit seqs, null bodies), clears one database, keeps the others", async () => {
      const { store, reopen } = make();
      await store.transaction(async (tx) => {
        await tx.putDoc({ database: "db", id: "a", rev: "1-x", seq: 9007199254740993n, deleted: false, body: { n: 1, nested: { a: [1, "x", null] } } });
        await tx.putDoc({ database: "db", id: "b", rev: "2-y", seq: 2n, deleted: true, body: null });
        await tx.putDoc({ database: "other", id: "a", rev: "1-z", seq: 3n, deleted: false, body: {} });
      });
      assert.deepEqual(await store.transaction(async (tx) => tx.getDoc("db", "a")), {
        database: "db",
        id: "a",
        rev: "1-x",
        seq: 9007199254740993n,
        deleted: false,
        body: { n: 1, nested: { a: [1, "x", null] } },
      });
      await store.transaction(async (tx) => tx.clearDocs("db"));
      await store.close();
      const again = reopen();
      const snapshot = await again.load();
      assert.deepEqual(snapshot.docs.map((d) => [d.database, d.id]), [["other", "a"]]);
      await again.close();
    });

    it("keeps the outbox in key order, per document too; replaces by key; deletes", async () => {
      const { store, reopen } = make();
      await store.transaction(async (tx) => {
        await tx.putOutbox(entry("k3", "a"));
        await tx.putOutbox(entry("k1", "b"));
        await tx.putOutbox(entry("k2", "a", { op: "delete", body: null, failed: { reason: "invalid", message: "m" } }));
      });
      await store.transaction(async (tx) => {
        assert.deepEqual((await tx.outboxOf("db", "a")).map((r) => r.key), ["k2", "k3"]);
        assert.deepEqual((await tx.allOutbox()).map((r) => r.key), ["k1", "k2", "k3"]);
        const many = await tx.outboxOfDocs("db", ["a", "b", "none"]);
        assert.deepEqual([...many].map(([id, rows]) => [id, rows.map((r) => r.key)]).sort(), [["a", ["k2", "k3"]], ["b", ["k1"]]]);
        await tx.putOutbox(entry("k1", "b", { baseRev: "1-abc", requestId: "replaced" }));
        await tx.deleteOutbox("k3");
      });
      await store.close();
      const again = reopen();
      const { outbox } = await again.load();
      assert.deepEqual(outbox.map((r) => [r.key, r.requestId, r.baseRev]), [
        ["k1", "replaced", "1-abc"],
        ["k2", "r-k2", null],
      ]);
      assert.deepEqual(outbox[1]!.failed, { reason: "invalid", message: "m" });
      await again.close();
    });

    it("a transaction whose function throws writes nothing", async () => {
      const { store } = make();
      await assert.rejects(
        store.transaction(async (tx) => {
          await tx.setMeta("position", "1");
          await tx.putOutbox(entry("k1", "a"));
          throw new Error("boom");
        }),
        /boom/,
      );
      const snapshot = await store.load();
      assert.deepEqual([snapshot.outbox, snapshot.meta], [[], {}]);
      await store.transaction(async (tx) => {
        await tx.setMeta("position", "2");
        await tx.setMeta("gone", "x");
        await tx.setMeta("gone", undefined);
      });
      assert.deepEqual((await store.load()).meta, { position: "2" });
      await store.close();
    });

    it("runs transactions one after another, in the order asked: each sees the ones before", async () => {
      const { store } = make();
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
      assert.deepEqual(seen, ["a:0", "b:1", "c:2"]);
      assert.equal((await store.load()).meta.n, "3");
      await store.close();
    });
  });
}

conformance("memory", () => {
  const store = memoryStore();
  return { store, reopen: () => store };
});

let files = 0;
conformance("SQLite", () => {
  const path = join(dir, `s${files++}.db`);
  return { store: sqliteStore(path), reopen: () => sqliteStore(path) };
});
