// SyncClient against the in-memory server: first sync, live loads, resume,
// backoff, OUT_OF_RANGE resync, progress, shutdown, re-created and deleted
// databases, fatal errors, bearer tokens. Every test asserts exact calls.
import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { bearerAuth } from "../src/transport.js";
import { MemoryStateStore } from "../src/store.js";
import { SyncClient, type ChangesBatch, type ResyncInfo, type SyncClientOptions, type SyncStatus } from "../src/sync-client.js";
import { agsyncError, FakeServer, waitFor } from "./fake-server.js";

const KEY = "org.example.sync.Cars";

interface Harness {
  server: FakeServer;
  client: SyncClient;
  store: MemoryStateStore;
  batches: ChangesBatch[];
  statuses: SyncStatus[];
  delays: number[];
  resyncs: ResyncInfo[];
  deleted: [string, bigint][];
  notified: bigint[];
}

const running: SyncClient[] = [];
afterEach(async () => {
  await Promise.all(running.splice(0).map((c) => c.stop()));
});

function harness(server: FakeServer, options: Partial<SyncClientOptions> = {}, store = new MemoryStateStore()): Harness {
  const h: Partial<Harness> = { server, store, batches: [], statuses: [], delays: [], resyncs: [], deleted: [], notified: [] };
  h.client = new SyncClient({
    transport: server.transport(),
    syncKeys: [KEY],
    store,
    backoff: { initialMs: 100, maxMs: 1000 },
    random: () => 0.5,
    // Record the delay and go on at once: the tests check the schedule, not the clock.
    sleep: async (ms) => {
      h.delays!.push(ms);
      await new Promise((r) => setTimeout(r, 1));
    },
    onChanges: (batch) => void h.batches!.push(batch),
    onStatus: (status) => void h.statuses!.push(status),
    onResync: (info) => void h.resyncs!.push(info),
    onDatabaseDeleted: (db, seq) => void h.deleted!.push([db, seq]),
    onNotify: (n) => void h.notified!.push(n.seq),
    ...options,
  });
  running.push(h.client);
  return h as Harness;
}

function live(h: Harness): Promise<void> {
  return waitFor(() => h.client.status.state === "live", "the client to be live");
}

function ids(batch: ChangesBatch | undefined): string[] {
  return batch?.changes.map((c) => c.id) ?? [];
}

/** A server with database "cars" (key KEY, docs a, b, c at seqs 1-3) and "boats" (another key, doc x at 4). */
function seeded(): FakeServer {
  const server = new FakeServer();
  server.createDatabase("cars", KEY);
  server.put("cars", "a", { model: "Mustang" });
  server.put("cars", "b", { model: "Beetle" });
  server.put("cars", "c", { model: "Mini" });
  server.createDatabase("boats", "org.example.sync.Boats");
  server.put("boats", "x", { model: "Dinghy" });
  return server;
}

describe("SyncClient", () => {
  it("first sync: subscribes live, loads every database of its keys page by page, saves the head as its position", async () => {
    const h = harness(seeded(), { pageSize: 2 });
    h.client.start();
    await live(h);
    assert.equal(h.server.subscribeRequests.length, 1);
    assert.equal(h.server.subscribeRequests[0]!.since, undefined, "no since on the first sync");
    assert.deepEqual(h.server.subscribeRequests[0]!.syncKeys, [KEY]);
    assert.deepEqual(
      h.server.changesRequests.map((r) => [r.database, r.since, r.limit, r.includeDocs]),
      [
        ["cars", 0n, 2, true],
        ["cars", 2n, 2, true],
        ["cars", 3n, 2, true],
      ],
      "only cars (boats has another key), paged until an empty page",
    );
    assert.deepEqual(
      h.batches.map((b) => [b.database, b.since, b.lastSeq, b.reset, ids(b)]),
      [
        ["cars", 0n, 2n, true, ["a", "b"]],
        ["cars", 2n, 3n, false, ["c"]],
      ],
    );
    assert.deepEqual(h.batches[0]!.changes[0]!.body, { model: "Mustang" });
    assert.deepEqual(h.store.get(), { syncKeys: [KEY], seq: 4n, databases: { cars: 3n } });
    assert.deepEqual(h.client.status, { state: "live", seq: 4n, headSeq: 4n });
  });

  it("a notification loads only what changed since the last load, and saves its seq", async () => {
    const h = harness(seeded());
    h.client.start();
    await live(h);
    h.batches.length = 0;
    h.server.changesRequests.length = 0;
    const d = h.server.put("cars", "d", { model: "Fiesta" });
    await waitFor(() => h.store.get()?.seq === d.seq, "the notification's seq saved");
    assert.deepEqual(h.server.changesRequests.map((r) => r.since), [3n, 5n]);
    assert.deepEqual(h.batches.map((b) => [b.since, b.lastSeq, b.reset, ids(b)]), [[3n, 5n, false, ["d"]]]);
    assert.deepEqual(h.store.get()?.databases, { cars: 5n });
    assert.equal(h.client.status.seq, 5n);
  });

  it("skips the load for a notification an earlier load already covered", async () => {
    const server = seeded();
    // The saved state already has cars up to seq 3, but the event position is 1:
    // replaying seqs 2 and 3 needs no Changes call.
    const store = new MemoryStateStore({ syncKeys: [KEY], seq: 1n, databases: { cars: 3n } });
    const h = harness(server, {}, store);
    h.client.start();
    await live(h);
    assert.deepEqual(server.subscribeRequests.map((r) => r.since), [1n]);
    assert.deepEqual(server.changesRequests, []);
    assert.deepEqual(h.batches, []);
    assert.equal(store.get()?.seq, 3n);
  });

  it("resumes with since after a broken stream, backing off exponentially with jitter, capped, reset once live", async () => {
    const server = seeded();
    const h = harness(server);
    h.client.start();
    await live(h);
    const unavailable = () => new ConnectError("connection reset", Code.Unavailable);
    server.refuseSubscribes.push(unavailable(), unavailable(), unavailable(), unavailable(), unavailable());
    h.batches.length = 0;
    server.failStreams(unavailable());
    // Written while the client is away (the failed stream drops it): replayed on resume.
    const e = server.put("cars", "e", { model: "Golf" });
    await waitFor(() => h.client.status.state === "live" && server.subscribeRequests.length === 7, "the client live again");
    // Ceiling 100, 200, 400, 800, 1000 (capped), 1000: with random 0.5, three quarters of it.
    assert.deepEqual(h.delays, [75, 150, 300, 600, 750, 750]);
    assert.deepEqual(server.subscribeRequests.slice(1).map((r) => r.since), [4n, 4n, 4n, 4n, 4n, 4n]);
    assert.deepEqual(h.batches.map((b) => [b.since, ids(b)]), [[3n, ["e"]]], "only the missed document");
    assert.equal(h.store.get()?.seq, e.seq);
    const reconnecting = h.statuses.filter((s) => s.state === "reconnecting");
    assert.deepEqual(
      reconnecting.map((s) => (s.state === "reconnecting" ? [s.attempt, s.delayMs, s.error.code] : [])),
      [
        [1, 75, Code.Unavailable],
        [2, 150, Code.Unavailable],
        [3, 300, Code.Unavailable],
        [4, 600, Code.Unavailable],
        [5, 750, Code.Unavailable],
        [6, 750, Code.Unavailable],
      ],
    );
    // Healthy again: the next failure starts from the first delay.
    server.failStreams(unavailable());
    await waitFor(() => server.subscribeRequests.length === 8 && h.client.status.state === "live", "live again");
    assert.deepEqual(h.delays.slice(6), [75]);
    assert.equal(server.subscribeRequests[7]!.since, e.seq);
  });

  it("OUT_OF_RANGE (SINCE_TOO_OLD): tells the app, then resyncs from scratch", async () => {
    const server = seeded();
    server.oldestSeq = 3n;
    const store = new MemoryStateStore({ syncKeys: [KEY], seq: 1n, databases: { cars: 1n, gone: 7n } });
    const subscribed: (bigint | undefined)[] = [];
    const h = harness(server, { onSubscribe: (since) => void subscribed.push(since) }, store);
    h.client.start();
    await live(h);
    assert.deepEqual(subscribed, [1n, undefined]);
    assert.equal(h.resyncs.length, 1);
    assert.equal(h.resyncs[0]!.reason, "SINCE_TOO_OLD");
    assert.equal(h.resyncs[0]!.oldestSeq, 3n);
    assert.equal(h.resyncs[0]!.error.code, Code.OutOfRange);
    assert.deepEqual(server.subscribeRequests.map((r) => r.since), [1n, undefined]);
    assert.deepEqual(h.delays, [], "a resync needs no backoff");
    assert.deepEqual(h.batches.map((b) => [b.since, b.reset, ids(b)]), [[0n, true, ["a", "b", "c"]]]);
    assert.deepEqual(h.deleted, [], "the resync dropped every database position: nothing left to report deleted");
    assert.deepEqual(store.get(), { syncKeys: [KEY], seq: 4n, databases: { cars: 3n } });
  });

  it("a progress event advances the saved position", async () => {
    const server = seeded();
    const h = harness(server);
    h.client.start();
    await live(h);
    server.notify("org.example.sync.Boats", {}); // seq 5, not for us
    server.put("boats", "y", {}); // seq 6, not for us
    server.progress();
    await waitFor(() => h.store.get()?.seq === 6n, "progress saved");
    assert.deepEqual(h.client.status, { state: "live", seq: 6n, headSeq: 4n });
  });

  it("shutdown: UNAVAILABLE naming since resumes from that since after the first delay", async () => {
    const server = seeded();
    const h = harness(server);
    h.client.start();
    await live(h);
    server.put("boats", "y", {}); // seq 5, for another key
    server.failStreams(
      agsyncError(Code.Unavailable, "the server is shutting down; subscribe again with since 5", "SHUTTING_DOWN", { since: "5" }),
    );
    await waitFor(() => server.subscribeRequests.length === 2 && h.client.status.state === "live", "resubscribed");
    assert.equal(server.subscribeRequests[1]!.since, 5n);
    assert.deepEqual(h.delays, [75]);
  });

  it("a database deleted and created again is reloaded from the start (database_created_seq)", async () => {
    const server = seeded();
    const store = new MemoryStateStore({ syncKeys: [KEY], seq: 3n, databases: { cars: 3n } });
    server.deleteDatabase("cars"); // seq 5
    server.createDatabase("cars", KEY); // created_seq 5
    const f = server.put("cars", "f", { model: "Panda" }); // seq 6
    const h = harness(server, {}, store);
    h.client.start();
    await live(h);
    assert.deepEqual(h.deleted, [["cars", 5n]]);
    assert.deepEqual(h.batches.map((b) => [b.since, b.reset, ids(b)]), [[0n, true, ["f"]]]);
    assert.deepEqual(store.get(), { syncKeys: [KEY], seq: f.seq, databases: { cars: 6n } });
  });

  it("a stale position of a re-created database reloads from 0 even without the delete notification", async () => {
    const server = new FakeServer();
    server.seq = 20n;
    server.createDatabase("cars", KEY); // created_seq 20
    server.put("cars", "g", {}); // seq 21
    const store = new MemoryStateStore({ syncKeys: [KEY], seq: 20n, databases: { cars: 9n } });
    const h = harness(server, {}, store);
    h.client.start();
    await waitFor(() => store.get()?.seq === 21n, "caught up");
    assert.deepEqual(server.changesRequests.map((r) => r.since), [9n, 0n, 21n]);
    assert.deepEqual(h.batches.map((b) => [b.since, b.reset, ids(b)]), [[0n, true, ["g"]]]);
  });

  it("Notify notifications go to onNotify without loading anything", async () => {
    const server = seeded();
    const h = harness(server);
    h.client.start();
    await live(h);
    const before = server.changesRequests.length;
    const seq = server.notify(KEY, { reason: "price list" });
    await waitFor(() => h.store.get()?.seq === seq, "notify handled");
    assert.deepEqual(h.notified, [seq]);
    assert.equal(server.changesRequests.length, before);
  });

  it("with `databases`, loads only those", async () => {
    const server = seeded();
    server.createDatabase("trucks", KEY);
    server.put("trucks", "t", {});
    const h = harness(server, { databases: ["trucks"] });
    h.client.start();
    await live(h);
    assert.deepEqual(h.batches.map((b) => [b.database, ids(b)]), [["trucks", ["t"]]]);
    const before = server.changesRequests.length;
    const write = server.put("cars", "z", {});
    await waitFor(() => h.store.get()?.seq === write.seq, "notification handled");
    assert.equal(server.changesRequests.length, before, "cars is not loaded");
  });

  it("stops, without retrying, on UNAUTHENTICATED", async () => {
    const server = seeded();
    server.refuseSubscribes.push(new ConnectError("missing bearer token", Code.Unauthenticated));
    const errors: Code[] = [];
    const h = harness(server, { onError: (e) => void errors.push(e.code) });
    h.client.start();
    await waitFor(() => h.client.status.state === "stopped", "stopped");
    const status = h.client.status;
    assert.equal(status.state === "stopped" ? status.error?.code : undefined, Code.Unauthenticated);
    assert.deepEqual(errors, [Code.Unauthenticated]);
    assert.equal(server.subscribeRequests.length, 1);
    assert.deepEqual(h.delays, []);
  });

  it("an app callback that throws is retried from the same position", async () => {
    const server = seeded();
    let failures = 1;
    const seen: string[][] = [];
    const h = harness(server, {
      onChanges: (batch) => {
        seen.push(ids(batch));
        if (failures-- > 0) throw new Error("disk full");
      },
    });
    h.client.start();
    await live(h);
    assert.deepEqual(seen, [["a", "b", "c"], ["a", "b", "c"]]);
    assert.deepEqual(h.delays, [75]);
    assert.deepEqual(h.store.get(), { syncKeys: [KEY], seq: 4n, databases: { cars: 3n } });
  });

  it("stop() closes the stream and ends in status stopped", async () => {
    const server = seeded();
    const h = harness(server);
    h.client.start();
    await live(h);
    assert.equal(server.openStreams, 1);
    await h.client.stop();
    await waitFor(() => server.openStreams === 0, "the server to see the stream close");
    assert.deepEqual(h.client.status, { state: "stopped", seq: 4n });
  });

  it("sends the bearer token on the stream and on every call, asking the token source each time", async () => {
    const server = seeded();
    let token = "first";
    const h = harness(server, { transport: server.transport([bearerAuth(() => token)]) });
    h.client.start();
    await live(h);
    token = "second";
    const write = server.put("cars", "h", {});
    await waitFor(() => h.store.get()?.seq === write.seq, "loaded");
    assert.deepEqual(server.authorization, [
      "Bearer first", // Subscribe
      "Bearer first", // ListDatabases
      "Bearer first", // Changes since 0
      "Bearer first", // Changes since 3 (empty)
      "Bearer second", // Changes since 3
      "Bearer second", // Changes since 5 (empty)
    ]);
  });
});
