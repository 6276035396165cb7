// The replica against the in-memory server, with a fake clock: optimistic
// writes, the outbox (batching, order, retries with backoff, exactly once
// across lost responses and reloads), conflicts (three-way merge, edit vs
// delete), rejections kept or dropped, pulls under pending edits, echoes,
// resync, deleted databases, token refresh, storage errors, whenSynced.
import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";
import type { JsonObject } from "@bufbuild/protobuf";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { openReplica, type Replica, type ReplicaOptions, type DocumentChange } from "../src/replica.js";
import { memoryStore, META_INFLIGHT, type ReplicaStorage } from "../src/storage.js";
import type { Rejection, WriteOutcome, InflightBatch } from "../src/outbox.js";
import { fieldMerge } from "../src/resolve.js";
import { agsyncError, FakeServer, waitFor } from "./fake-server.js";
import { FakeClock } from "./fake-clock.js";

const DB = "todos";

interface Harness {
  server: FakeServer;
  store: ReplicaStorage;
  clock: FakeClock;
  replica: Replica;
  outcomes: WriteOutcome[];
  rejections: Rejection[];
}

const open: Replica[] = [];
afterEach(async () => {
  await Promise.all(open.splice(0).map((r) => r.close()));
});

async function start(
  server: FakeServer,
  options: Partial<ReplicaOptions> & { store?: ReplicaStorage; clock?: FakeClock; interceptors?: Interceptor[] } = {},
): Promise<Harness> {
  const store = options.store ?? memoryStore();
  const clock = options.clock ?? new FakeClock();
  const outcomes: WriteOutcome[] = [];
  const rejections: Rejection[] = [];
  const replica = await openReplica({
    transport: server.transport(options.interceptors ?? []),
    databases: [DB],
    store,
    clock,
    random: () => 0.5,
    backoff: { initialMs: 100, maxMs: 1000 },
    coordination: "solo",
    onOutcome: (o) => void outcomes.push(o),
    onRejected: (r) => void rejections.push(r),
    ...options,
  });
  open.push(replica);
  return { server, store, clock, replica, outcomes, rejections };
}

async function closeReplica(h: Harness): Promise<void> {
  await h.replica.close();
  open.splice(open.indexOf(h.replica), 1);
}

function seeded(): FakeServer {
  const server = new FakeServer();
  server.createDatabase(DB);
  server.put(DB, "a", { title: "milk", done: false });
  server.put(DB, "b", { title: "eggs", done: false });
  return server;
}

function live(h: Harness): Promise<void> {
  return waitFor(() => h.replica.status.stream === "live", "the stream to be live");
}

function synced(h: Harness, timeoutMs = 3000): Promise<void> {
  return waitFor(() => h.replica.status.pending === 0 && h.replica.status.connection === "online", "the replica to be synced", timeoutMs);
}

/** Coordination for a tab that never becomes the leader (it only queues). */
function neverLeads(): ReplicaOptions["coordination"] {
  return {
    lock: () => new Promise(() => {}),
    channel: () => ({ postMessage() {}, onmessage: null, close() {} }),
  };
}

function generation(rev: string): number {
  return Number(rev.split("-")[0]);
}

describe("Replica: local reads and optimistic writes", () => {
  it("answers reads from the local copy, and a put is visible at once, pending, then applied once", async () => {
    const h = await start(seeded());
    await live(h);
    assert.deepEqual(h.replica.all(DB).map((d) => [d.id, d.body, d.pending]), [
      ["a", { title: "milk", done: false }, false],
      ["b", { title: "eggs", done: false }, false],
    ]);
    const changes: DocumentChange[][] = [];
    h.replica.subscribe((c) => void changes.push(c));
    const saved = h.replica.put(DB, "a", { title: "milk", done: true });
    // Visible before the promise resolves: nothing awaited yet.
    assert.deepEqual(h.replica.get(DB, "a")?.body, { title: "milk", done: true });
    assert.equal(h.replica.get(DB, "a")?.pending, true);
    assert.equal(h.replica.status.pending, 1);
    const receipt = await saved;
    await synced(h);
    const doc = h.replica.get(DB, "a")!;
    assert.equal(doc.pending, false);
    assert.match(doc.rev, /^2-/);
    assert.deepEqual(h.server.doc(DB, "a")?.body, { title: "milk", done: true });
    assert.deepEqual(
      h.outcomes.map((o) => [o.kind, o.requestId]),
      [["applied", receipt.requestId]],
    );
    assert.deepEqual(
      h.server.writeCalls.map((c) => [c.method, c.replayed, c.items]),
      [["bulkPut", false, 1]],
    );
    // The listener saw the optimistic change first, with pending set.
    assert.equal(changes[0]![0]!.doc?.pending, true);
    assert.equal(changes.at(-1)![0]!.doc?.pending, false);
  });

  it("refuses bodies agsync cannot store, before queueing anything", async () => {
    const h = await start(seeded());
    assert.throws(() => h.replica.put(DB, "x", { n: Number.NaN }), /finite/);
    assert.throws(() => h.replica.put(DB, "x", { _id: 1 }), /reserved/);
    assert.throws(() => h.replica.put(DB, "", {}), /non-empty/);
    assert.throws(() => h.replica.put("other", "x", {}), /not replicated/);
    assert.equal(h.replica.status.pending, 0);
  });

  it("a storage failure takes the edit back and says the storage is full", async () => {
    let full = false;
    const quota = Object.assign(new Error("The quota has been exceeded."), { name: "QuotaExceededError" });
    const store = memoryStore({ failCommit: () => (full ? quota : undefined) });
    const h = await start(seeded(), { store });
    await live(h);
    full = true;
    await assert.rejects(h.replica.put(DB, "c", { title: "bread" }), (err: Error & { quota?: boolean }) => {
      assert.equal(err.name, "ReplicaStorageError");
      assert.equal(err.quota, true);
      assert.match(err.message, /storage is full/);
      return true;
    });
    assert.equal(h.replica.get(DB, "c"), undefined);
    assert.equal(h.replica.status.pending, 0);
    assert.equal(h.replica.status.lastError?.quota, true);
  });
});

describe("Replica: upload", () => {
  it("batches the outbox into BulkPuts of at most maxBatch, in order, one edit per document per batch", async () => {
    const server = seeded();
    const store = memoryStore({ sharedName: "batching" });
    // The server's state as a tab that loaded it would have it.
    await store.transaction(async (tx) => {
      for (const id of ["a", "b"]) {
        const d = server.doc(DB, id)!;
        await tx.putDoc({ database: DB, id, rev: d.rev, seq: d.seq, deleted: false, body: d.body });
      }
    });
    // A follower tab queues (it never uploads), then a leader opens.
    const queued = await start(server, { store, coordination: neverLeads() });
    for (let i = 0; i < 120; i++) await queued.replica.put(DB, `d${i}`, { n: i });
    for (let i = 0; i < 3; i++) await queued.replica.put(DB, "a", { title: "milk", done: false, edit: i });
    await closeReplica(queued);
    const h = await start(server, { store, maxBatch: 50, coordination: "solo" });
    await synced(h);
    const sent = server.writeCalls.filter((c) => !c.replayed).map((c) => c.items);
    // a (edit 0) joins the first batch's tail position; its later edits go one per batch.
    assert.deepEqual(sent, [50, 50, 21, 1, 1]);
    assert.equal(generation(server.doc(DB, "a")!.rev), 4);
    assert.deepEqual(server.doc(DB, "a")!.body, { title: "milk", done: false, edit: 2 });
    assert.equal(h.outcomes.filter((o) => o.kind === "applied").length, 123);
    assert.equal(h.replica.all(DB).length, 122);
  });

  it("retries with backoff while the server is unreachable, and each edit is applied once", async () => {
    const server = seeded();
    const h = await start(server);
    await live(h);
    server.failWrites = 4;
    await h.replica.put(DB, "c", { title: "bread" });
    await synced(h);
    // 100, 200, 400, 800 ceilings, with random 0.5: 75%.
    assert.deepEqual(h.clock.sleeps.filter((ms) => ms >= 75), [75, 150, 300, 600]);
    assert.equal(generation(server.doc(DB, "c")!.rev), 1);
    assert.deepEqual(server.writeCalls.map((c) => c.replayed), [false]);
  });

  it("a lost response is retried with the same request_id and the same items: the server answers from its record", async () => {
    const server = seeded();
    const h = await start(server);
    await live(h);
    server.loseResponses = 2;
    const receipt = await h.replica.put(DB, "c", { title: "bread" });
    await synced(h);
    assert.deepEqual(
      server.writeCalls.map((c) => [c.method, c.replayed]),
      [
        ["bulkPut", false],
        ["bulkPut", true],
        ["bulkPut", true],
      ],
    );
    assert.equal(new Set(server.writeCalls.map((c) => c.requestId)).size, 1);
    assert.equal(generation(server.doc(DB, "c")!.rev), 1);
    assert.deepEqual(h.outcomes.map((o) => [o.kind, o.requestId]), [["applied", receipt.requestId]]);
  });

  it("a reload while a batch is in flight sends exactly that batch again", async () => {
    const server = seeded();
    const clock = new FakeClock({ auto: false });
    const store = memoryStore();
    const first = await start(server, { store, clock });
    await live(first);
    server.loseResponses = 1;
    await first.replica.put(DB, "c", { title: "bread" });
    await waitFor(() => server.writeCalls.length === 1 && clock.waiting > 0, "the first attempt");
    const inflight = JSON.parse((await store.load()).meta[META_INFLIGHT]!) as InflightBatch;
    assert.equal(inflight.requestId, server.writeCalls[0]!.requestId);
    // Meanwhile the user edits again: not part of the saved batch.
    await first.replica.put(DB, "c", { title: "bread", done: true });
    await closeReplica(first);

    const second = await start(server, { store, clock: new FakeClock() });
    await synced(second);
    assert.deepEqual(
      server.writeCalls.map((c) => [c.requestId === inflight.requestId, c.replayed, c.items]),
      [
        [true, false, 1],
        [true, true, 1],
        [false, false, 1],
      ],
    );
    assert.equal(generation(server.doc(DB, "c")!.rev), 2);
    assert.deepEqual(server.doc(DB, "c")!.body, { title: "bread", done: true });
  });

  it("REQUEST_ID_REUSED is surfaced: the edits are reported rejected and the error shown", async () => {
    const server = seeded();
    const clock = new FakeClock({ auto: false });
    const store = memoryStore();
    const h = await start(server, { store, clock });
    await live(h);
    server.failWrites = 1;
    await h.replica.put(DB, "c", { title: "bread" });
    await waitFor(() => clock.waiting > 0 && (store as unknown as { meta: Map<string, string> }).meta.has(META_INFLIGHT), "a saved batch");
    const inflight = JSON.parse((await store.load()).meta[META_INFLIGHT]!) as InflightBatch;
    server.poisonRequestId(DB, inflight.requestId);
    await clock.advance(10_000);
    await waitFor(() => h.rejections.length === 1, "the rejection");
    assert.equal(h.rejections[0]!.reason, "request-id-reused");
    assert.deepEqual(h.rejections[0]!.body, { title: "bread" });
    assert.equal(h.replica.status.pending, 0);
    await waitFor(() => h.replica.status.lastError !== undefined, "the error in the status");
    assert.match(h.replica.status.lastError!.message, /rejected \(request-id-reused\)|request_id/);
  });

  it("a rejected edit can be kept (it waits, the others go on), retried, or discarded", async () => {
    const server = seeded();
    server.maxDocBytes = 100;
    const h = await start(server, { onRejected: (r) => (h.rejections.push(r), "keep") });
    await live(h);
    const big = await h.replica.put(DB, "big", { text: "x".repeat(200) });
    await h.replica.put(DB, "small", { text: "y" });
    await waitFor(() => h.replica.status.failed === 1 && h.replica.status.pending === 1, "one kept, one sent");
    assert.equal(server.doc(DB, "small")?.body.text, "y");
    assert.deepEqual([h.rejections[0]!.reason, h.rejections[0]!.requestId], ["too_large", big.requestId]);
    assert.equal(h.replica.get(DB, "big")?.failed, true);
    // A later edit of the kept document waits behind it.
    await h.replica.put(DB, "big", { text: "z" });
    assert.equal(h.replica.status.pending, 2);
    server.maxDocBytes = 1000;
    await h.replica.retryFailed();
    await synced(h);
    assert.deepEqual(server.doc(DB, "big")?.body, { text: "z" });
    assert.equal(generation(server.doc(DB, "big")!.rev), 2);

    server.maxDocBytes = 10;
    const again = await h.replica.put(DB, "big", { text: "too long again" });
    await waitFor(() => h.replica.status.failed === 1, "kept");
    await h.replica.discard(again.requestId);
    assert.equal(h.replica.status.pending, 0);
    assert.deepEqual(h.replica.get(DB, "big")?.body, { text: "z" });
  });
});

describe("Replica: conflicts", () => {
  it("disjoint field changes combine (three-way merge), sent against the new rev", async () => {
    const server = seeded();
    const h = await start(server);
    await live(h);
    server.failWrites = 1_000_000;
    await h.replica.put(DB, "a", { title: "milk", done: true });
    server.put(DB, "a", { title: "oat milk", done: false }); // someone else, meanwhile
    await waitFor(() => h.replica.get(DB, "a")?.rev.startsWith("2-") === true, "the remote change pulled");
    // Pulled under the pending edit: the view is the server's state with the edit on top.
    assert.deepEqual(h.replica.get(DB, "a")?.body, { title: "oat milk", done: true });
    assert.equal(h.replica.get(DB, "a")?.pending, true);
    server.failWrites = 0;
    h.replica.retryFailed(); // wakes the uploader
    await synced(h);
    assert.deepEqual(server.doc(DB, "a")?.body, { title: "oat milk", done: true });
    assert.equal(generation(server.doc(DB, "a")!.rev), 3);
    const [merged, applied] = h.outcomes;
    assert.equal(merged?.kind, "merged");
    assert.equal(applied?.kind, "applied");
    assert.equal(merged?.kind === "merged" && merged.replacedBy, applied?.requestId);
  });

  it("on an overlap the server wins by default; prefer: local makes the edit win", async () => {
    for (const prefer of ["remote", "local"] as const) {
      const server = seeded();
      const h = await start(server, { resolve: fieldMerge({ prefer }) });
      await live(h);
      server.failWrites = 1_000_000;
      await h.replica.put(DB, "a", { title: "mine", done: false });
      server.put(DB, "a", { title: "theirs", done: false });
      await waitFor(() => h.replica.get(DB, "a")?.rev.startsWith("2-") === true, "pulled");
      server.failWrites = 0;
      void h.replica.retryFailed();
      await synced(h);
      assert.equal(server.doc(DB, "a")?.body.title, prefer === "remote" ? "theirs" : "mine");
      // With the server winning, nothing is left to write: merged, no new revision.
      assert.equal(generation(server.doc(DB, "a")!.rev), prefer === "remote" ? 2 : 3);
      assert.equal(h.outcomes[0]?.kind, "merged");
      await closeReplica(h);
    }
  });

  it("the resolver gets base, local and remote; edit against delete is rejected with its content by default", async () => {
    const server = seeded();
    const seen: unknown[] = [];
    const h = await start(server, {
      resolve: (c) => {
        seen.push(c);
        return fieldMerge()(c);
      },
    });
    await live(h);
    server.failWrites = 1_000_000;
    await h.replica.put(DB, "a", { title: "milk", done: true });
    server.remove(DB, "a");
    await waitFor(() => h.replica.get(DB, "a")?.rev.startsWith("2-") === true, "the tombstone pulled");
    // The pending edit still shows over the deletion until the resolver decides.
    assert.deepEqual(h.replica.get(DB, "a")?.body, { title: "milk", done: true });
    server.failWrites = 0;
    void h.replica.retryFailed();
    await waitFor(() => h.rejections.length === 1, "the rejection");
    assert.deepEqual(seen, [{ database: DB, id: "a", base: { title: "milk", done: false }, local: { title: "milk", done: true }, remote: undefined, remoteRev: "" }]);
    assert.deepEqual([h.rejections[0]!.reason, h.rejections[0]!.body], ["conflict", { title: "milk", done: true }]);
    await synced(h);
    assert.equal(h.replica.get(DB, "a"), undefined);
  });

  it("delete against an edit on the server: rejected by default, the edited document stays", async () => {
    const server = seeded();
    const h = await start(server);
    await live(h);
    server.failWrites = 1_000_000;
    await h.replica.delete(DB, "b");
    assert.equal(h.replica.get(DB, "b"), undefined);
    server.put(DB, "b", { title: "eggs", done: true });
    server.failWrites = 0;
    void h.replica.retryFailed();
    await waitFor(() => h.rejections.length === 1, "the rejection");
    assert.equal(h.rejections[0]!.op, "delete");
    await synced(h);
    assert.deepEqual(h.replica.get(DB, "b")?.body, { title: "eggs", done: true });
    assert.deepEqual(server.doc(DB, "b")?.body, { title: "eggs", done: true });
  });

  it("a delete goes through Delete with its request_id; deleted on both sides is merged, nothing written", async () => {
    const server = seeded();
    const h = await start(server);
    await live(h);
    const receipt = await h.replica.delete(DB, "a");
    await synced(h);
    assert.equal(server.doc(DB, "a"), undefined);
    assert.deepEqual(server.writeCalls.map((c) => [c.method, c.requestId]), [["delete", receipt!.requestId]]);
    server.failWrites = 1_000_000;
    await h.replica.delete(DB, "b");
    server.remove(DB, "b");
    server.failWrites = 0;
    void h.replica.retryFailed();
    await synced(h);
    assert.deepEqual(h.outcomes.map((o) => o.kind), ["applied", "merged"]);
    assert.equal(h.rejections.length, 0);
  });

  it("edits queued behind a merged one are rebased on its result", async () => {
    const server = seeded();
    const h = await start(server);
    await live(h);
    server.failWrites = 1_000_000;
    await h.replica.put(DB, "a", { title: "milk", done: true });
    await h.replica.put(DB, "a", { title: "milk", done: true, note: "2%" });
    server.put(DB, "a", { title: "oat milk", done: false });
    await waitFor(() => h.replica.get(DB, "a")?.rev.startsWith("2-") === true, "pulled");
    assert.deepEqual(h.replica.get(DB, "a")?.body, { title: "oat milk", done: true, note: "2%" });
    server.failWrites = 0;
    void h.replica.retryFailed();
    await synced(h);
    assert.deepEqual(server.doc(DB, "a")?.body, { title: "oat milk", done: true, note: "2%" });
    assert.equal(generation(server.doc(DB, "a")!.rev), 4);
  });
});

describe("Replica: pull, resync, lifecycle", () => {
  it("an upload's own echo is recognised by seq and not applied again", async () => {
    const server = seeded();
    const h = await start(server);
    await live(h);
    await h.replica.put(DB, "c", { title: "bread" });
    await synced(h);
    const changes: DocumentChange[][] = [];
    h.replica.subscribe((c) => void changes.push(c));
    await h.replica.whenSynced(); // waits for the echo's notification to be loaded
    assert.equal(changes.length, 0);
    server.put(DB, "c", { title: "rye bread" });
    await waitFor(() => changes.length === 1, "the remote change");
    assert.deepEqual(changes[0]!.map((c) => [c.id, c.doc?.body]), [["c", { title: "rye bread" }]]);
  });

  it("OUT_OF_RANGE reloads the replica without losing pending edits", async () => {
    const server = seeded();
    const store = memoryStore();
    const first = await start(server, { store });
    await live(first);
    await closeReplica(first);
    // Offline: an edit. Meanwhile the server's log is pruned past our position.
    server.failWrites = 1_000_000;
    server.put(DB, "b", { title: "eggs", done: true });
    server.oldestSeq = server.seq + 1n;
    const h = await start(server, { store });
    await h.replica.put(DB, "a", { title: "milk", done: true });
    await waitFor(() => h.replica.status.stream === "live", "live after the resync");
    assert.equal(server.subscribeRequests.at(-1)?.since, undefined, "subscribed again from scratch");
    assert.deepEqual(h.replica.get(DB, "b")?.body, { title: "eggs", done: true });
    assert.deepEqual(h.replica.get(DB, "a")?.body, { title: "milk", done: true });
    assert.equal(h.replica.get(DB, "a")?.pending, true);
    server.failWrites = 0;
    void h.replica.retryFailed();
    await synced(h);
    assert.deepEqual(server.doc(DB, "a")?.body, { title: "milk", done: true });
  });

  it("a deleted database reports its pending edits as rejected and drops its copy", async () => {
    const server = seeded();
    const h = await start(server);
    await live(h);
    server.failWrites = 1_000_000;
    await h.replica.put(DB, "a", { title: "milk", done: true });
    server.deleteDatabase(DB);
    await waitFor(() => h.rejections.length === 1, "the rejection");
    assert.deepEqual([h.rejections[0]!.reason, h.rejections[0]!.body], ["database-deleted", { title: "milk", done: true }]);
    assert.deepEqual(h.replica.all(DB), []);
    assert.equal(h.replica.status.pending, 0);
  });

  it("asks the token provider again on UNAUTHENTICATED and resumes", async () => {
    const server = seeded();
    const asked: boolean[] = [];
    const auth: Interceptor = (next) => async (req) => {
      if (req.header.get("authorization") !== "Bearer fresh") throw new ConnectError("token expired", Code.Unauthenticated);
      return next(req);
    };
    const h = await start(server, {
      interceptors: [auth],
      getToken: ({ refresh }) => {
        asked.push(refresh);
        return refresh ? "fresh" : "stale";
      },
    });
    await live(h);
    await h.replica.put(DB, "c", { title: "bread" });
    await synced(h);
    assert.equal(asked[0], false);
    assert.ok(asked.includes(true));
    assert.deepEqual(server.doc(DB, "c")?.body, { title: "bread" });
  });

  it("whenSynced waits for the outbox to empty and the stream to reach the server's head", async () => {
    const server = seeded();
    const h = await start(server);
    server.failWrites = 3;
    await h.replica.put(DB, "c", { title: "bread" });
    server.put(DB, "d", { title: "jam" });
    await h.replica.whenSynced();
    assert.equal(h.replica.status.pending, 0);
    assert.deepEqual(h.replica.get(DB, "d")?.body, { title: "jam" });
    assert.equal(h.replica.status.connection, "online");
    assert.equal(h.replica.status.lastSyncedSeq, server.seq);
  });

  it("reopening finds the pending edits (the outbox is stored with the edit)", async () => {
    const server = seeded();
    server.failWrites = 1_000_000;
    const store = memoryStore();
    const first = await start(server, { store });
    await live(first);
    await first.replica.put(DB, "a", { title: "milk", done: true });
    await first.replica.delete(DB, "b");
    await closeReplica(first);
    const second = await start(server, { store });
    assert.deepEqual(second.replica.all(DB).map((d) => [d.id, d.body, d.pending]), [["a", { title: "milk", done: true }, true]]);
    assert.equal(second.replica.status.pending, 2);
    server.failWrites = 0;
    void second.replica.retryFailed();
    await synced(second);
    assert.equal(server.doc(DB, "b"), undefined);
  });
});

describe("Replica: stream status", () => {
  it("reports offline while the stream cannot connect, online once live and empty", async () => {
    const server = seeded();
    server.refuseSubscribes.push(new ConnectError("down", Code.Unavailable), new ConnectError("down", Code.Unavailable));
    const clock = new FakeClock({ auto: false });
    const h = await start(server, { clock });
    await waitFor(() => h.replica.status.connection === "offline", "offline");
    assert.equal(h.replica.status.leader, true);
    await clock.advance(1000);
    await clock.advance(1000);
    await waitFor(() => h.replica.status.connection === "online", "online");
    assert.equal(agsyncError(Code.OutOfRange, "x", "SINCE_AHEAD", {}).code, Code.OutOfRange);
    const body: JsonObject = { title: "x" };
    void h.replica.put(DB, "z", body);
    assert.equal(h.replica.status.connection, "syncing");
  });
});
