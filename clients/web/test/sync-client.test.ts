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

// The tests that check the positions Changes pages leave (the paged path,
// which a server without Snapshot still gets) run with snapshot: false; the
// default, a Snapshot stream then Changes, is "SyncClient: Snapshot" below.
describe("SyncClient", () => {
  it("first sync: subscribes live, loads every database of its keys page by page, saves the head as its position", async () => {
    const h = harness(seeded(), { pageSize: 2, snapshot: false });
    h.client.start();
    await live(h);
    assert.deepEqual(h.server.snapshotRequests, [], "snapshot: false pages Changes from 0");
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
    const h = harness(seeded(), { snapshot: false });
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
    const h = harness(server, { snapshot: false });
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
    const h = harness(server, { snapshot: false, onSubscribe: (since) => void subscribed.push(since) }, store);
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
    const h = harness(server, { snapshot: false }, store);
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
      snapshot: false,
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

/** A MemoryStateStore that records the position of `database` at every save. */
class RecordingStore extends MemoryStateStore {
  readonly positions: (bigint | undefined)[] = [];
  constructor(readonly database = "cars") {
    super();
  }
  override set(state: Parameters<MemoryStateStore["set"]>[0]): void {
    this.positions.push(state.databases[this.database]);
    super.set(state);
  }
}

/** Applies batches the way an app does (reset drops the copy; replace by id), giving id -> body. */
function applied(batches: ChangesBatch[], database = "cars"): Map<string, unknown> {
  const copy = new Map<string, unknown>();
  for (const b of batches.filter((b) => b.database === database)) {
    if (b.reset) copy.clear();
    for (const c of b.changes) {
      if (c.deleted) copy.delete(c.id);
      else copy.set(c.id, c.body);
    }
  }
  return copy;
}

/** The live documents of a fake server's database, id -> body. */
function serverDocs(server: FakeServer, database = "cars"): Map<string, unknown> {
  return new Map([...server.dbs.get(database)!.docs.values()].filter((d) => !d.deleted).map((d) => [d.id, d.body]));
}

/** seeded()'s cars documents take about 65 encoded bytes each: two per Snapshot message. */
const TWO_PER_MESSAGE = 140;

describe("SyncClient: Snapshot", () => {
  it("first sync: one Snapshot stream with JSON bodies, a batch per message, then Changes from the snapshot's seq", async () => {
    const server = seeded();
    server.snapshotMessageBytes = TWO_PER_MESSAGE;
    const store = new RecordingStore();
    const h = harness(server, {}, store);
    h.client.start();
    await live(h);
    assert.deepEqual(server.snapshotRequests.map((r) => [r.database, r.jsonBodies]), [["cars", true]]);
    assert.deepEqual(
      h.batches.map((b) => [b.database, b.since, b.lastSeq, b.reset, ids(b)]),
      [
        ["cars", 0n, 2n, true, ["a", "b"]],
        ["cars", 2n, 4n, false, ["c"]], // the last message: lastSeq is the snapshot's seq (the head, 4)
      ],
    );
    assert.deepEqual(h.batches[0]!.changes[0], { id: "a", rev: server.doc("cars", "a")!.rev, seq: 1n, deleted: false, body: { model: "Mustang" } });
    assert.deepEqual(
      server.changesRequests.map((r) => [r.database, r.since, r.includeDocs, r.jsonBodies]),
      [["cars", 4n, true, true]],
      "Changes from the snapshot's seq, to the end of the feed",
    );
    assert.deepEqual(store.positions, [2n, 4n, 4n], "the seq of the last document received, then the snapshot's seq");
    assert.deepEqual(store.get(), { syncKeys: [KEY], seq: 4n, databases: { cars: 4n } });
    assert.deepEqual(h.client.status, { state: "live", seq: 4n, headSeq: 4n });
    assert.equal(server.openSnapshots, 0);

    // Later writes load from the snapshot's seq on.
    const d = server.put("cars", "d", { model: "Fiesta" });
    await waitFor(() => store.get()?.seq === d.seq, "the notification handled");
    assert.deepEqual(h.batches.slice(2).map((b) => [b.since, b.lastSeq, b.reset, ids(b)]), [[4n, 5n, false, ["d"]]]);
    assert.equal(server.snapshotRequests.length, 1);
  });

  it("hands off to Changes: writes made while the snapshot is open come after it, none lost", async () => {
    const server = seeded();
    server.snapshotMessageBytes = TWO_PER_MESSAGE;
    server.beforeSnapshotMessage = (index) => {
      if (index !== 0) return;
      server.put("cars", "d", { model: "Fiesta" }); // 5: new
      server.put("cars", "a", { model: "Mustang GT" }); // 6: changed after the snapshot's seq
      server.remove("cars", "b"); // 7: deleted after it
    };
    const h = harness(server);
    h.client.start();
    await live(h);
    await waitFor(() => h.store.get()?.seq === 7n, "the writes' notifications handled");
    assert.deepEqual(
      h.batches.map((b) => [b.since, b.lastSeq, b.reset, ids(b)]),
      [
        [0n, 2n, true, ["a", "b"]],
        [2n, 4n, false, ["c"]],
        [4n, 7n, false, ["d", "a", "b"]],
      ],
    );
    assert.deepEqual(h.batches[0]!.changes[0]!.body, { model: "Mustang" }, "the snapshot holds a as of its seq");
    assert.equal(h.batches[2]!.changes[2]!.deleted, true);
    assert.deepEqual(server.changesRequests.map((r) => r.since), [4n, 7n], "the notifications of 5-7 need no load: the load covered them");
    assert.deepEqual(applied(h.batches), serverDocs(server));
    assert.deepEqual(h.store.get(), { syncKeys: [KEY], seq: 7n, databases: { cars: 7n } });
  });

  it("a stream broken mid-way keeps what arrived and goes on with Changes from the seq of the last document received", async () => {
    const server = seeded();
    server.snapshotMessageBytes = TWO_PER_MESSAGE;
    server.breakSnapshots.push({ afterMessages: 1, error: new ConnectError("the snapshot was not read for 30 s", Code.Unavailable) });
    server.beforeSnapshotMessage = (index) => {
      if (index === 0) server.put("cars", "c", { model: "Mini Cooper" }); // 5
    };
    const errors: Code[] = [];
    const store = new RecordingStore();
    const h = harness(server, { onError: (e) => void errors.push(e.code) }, store);
    h.client.start();
    await live(h);
    await waitFor(() => store.get()?.seq === 5n, "caught up");
    assert.deepEqual(
      h.batches.map((b) => [b.since, b.lastSeq, b.reset, ids(b)]),
      [
        [0n, 2n, true, ["a", "b"]],
        [2n, 5n, false, ["c"]],
      ],
    );
    assert.deepEqual(server.changesRequests.map((r) => r.since), [2n, 5n]);
    assert.deepEqual(store.positions.slice(0, 3), [2n, 5n, 5n]);
    assert.deepEqual(applied(h.batches), serverDocs(server));
    assert.equal(server.subscribeRequests.length, 1, "no reconnect");
    assert.deepEqual(errors, []);
    assert.deepEqual(h.delays, []);
  });

  it("a stream that sends nothing for callTimeoutMs counts as broken", async () => {
    const server = seeded();
    server.snapshotMessageBytes = TWO_PER_MESSAGE;
    server.beforeSnapshotMessage = (index) => (index === 1 ? new Promise((r) => setTimeout(r, 300)) : undefined);
    const h = harness(server, { callTimeoutMs: 50 });
    h.client.start();
    await live(h);
    assert.deepEqual(h.batches.map((b) => [b.since, b.lastSeq, b.reset, ids(b)]), [
      [0n, 2n, true, ["a", "b"]],
      [2n, 3n, false, ["c"]],
    ]);
    assert.deepEqual(server.changesRequests.map((r) => r.since), [2n, 3n]);
    assert.deepEqual(h.delays, []);
    await waitFor(() => server.openSnapshots === 0, "the server's stream ended");
  });

  it("a stream that fails before its first message is retried with backoff", async () => {
    const server = seeded();
    server.breakSnapshots.push({ afterMessages: 0, error: new ConnectError("too many snapshots", Code.Unavailable) });
    const h = harness(server);
    h.client.start();
    await waitFor(() => h.client.status.state === "live", "live");
    assert.equal(server.snapshotRequests.length, 2);
    assert.deepEqual(h.delays, [75]);
    assert.deepEqual(h.batches.map((b) => [b.since, b.lastSeq, b.reset, ids(b)]), [[0n, 4n, true, ["a", "b", "c"]]]);
    assert.deepEqual(h.store.get(), { syncKeys: [KEY], seq: 4n, databases: { cars: 4n } });
  });

  it("a last message without documents: the position moves to the snapshot's seq without a batch", async () => {
    const server = seeded();
    server.snapshotEmptyLast = true;
    const h = harness(server);
    h.client.start();
    await live(h);
    assert.deepEqual(h.batches.map((b) => [b.since, b.lastSeq, b.reset, ids(b)]), [[0n, 3n, true, ["a", "b", "c"]]]);
    assert.deepEqual(server.changesRequests.map((r) => r.since), [4n]);
    assert.deepEqual(h.store.get(), { syncKeys: [KEY], seq: 4n, databases: { cars: 4n } });
  });

  it("an empty database: one reset batch without documents", async () => {
    const server = new FakeServer();
    server.createDatabase("boats", "org.example.sync.Boats");
    server.put("boats", "x", {}); // 1
    server.createDatabase("cars", KEY); // created_seq 1, empty
    const h = harness(server);
    h.client.start();
    await live(h);
    assert.deepEqual(h.batches.map((b) => [b.database, b.since, b.lastSeq, b.reset, ids(b)]), [["cars", 0n, 1n, true, []]]);
    assert.deepEqual(server.changesRequests.map((r) => r.since), [1n]);
    assert.deepEqual(h.store.get(), { syncKeys: [KEY], seq: 1n, databases: { cars: 1n } });
    const d = server.put("cars", "d", { model: "Fiesta" });
    await waitFor(() => h.store.get()?.seq === d.seq, "loaded");
    assert.deepEqual(h.batches.slice(1).map((b) => [b.since, b.lastSeq, b.reset, ids(b)]), [[1n, 2n, false, ["d"]]]);
  });

  it("a server without Snapshot (UNIMPLEMENTED): pages Changes from 0 as before, and does not ask again", async () => {
    const server = seeded();
    server.snapshotSupported = false;
    const errors: Code[] = [];
    const h = harness(server, { pageSize: 2, onError: (e) => void errors.push(e.code) });
    h.client.start();
    await live(h);
    assert.equal(server.snapshotRequests.length, 1);
    assert.deepEqual(server.changesRequests.map((r) => [r.since, r.jsonBodies]), [
      [0n, true],
      [2n, true],
      [3n, true],
    ]);
    assert.deepEqual(h.batches.map((b) => [b.since, b.lastSeq, b.reset, ids(b)]), [
      [0n, 2n, true, ["a", "b"]],
      [2n, 3n, false, ["c"]],
    ]);
    assert.deepEqual(errors, [], "UNIMPLEMENTED from Snapshot does not stop the client");
    // A database first seen later is loaded from 0 with Changes straight away.
    server.createDatabase("trucks", KEY);
    const t = server.put("trucks", "t", { wheels: 6 });
    await waitFor(() => h.store.get()?.seq === t.seq, "trucks loaded");
    assert.equal(server.snapshotRequests.length, 1);
    assert.deepEqual(h.batches.slice(2).map((b) => [b.database, b.since, b.reset, ids(b)]), [["trucks", 0n, true, ["t"]]]);
  });

  it("with snapshot: false, never calls Snapshot", async () => {
    const server = seeded();
    const h = harness(server, { snapshot: false });
    h.client.start();
    await live(h);
    assert.deepEqual(server.snapshotRequests, []);
    assert.deepEqual(server.changesRequests.map((r) => r.since), [0n, 3n]);
    assert.deepEqual(h.batches.map((b) => [b.since, b.lastSeq, b.reset, ids(b)]), [[0n, 3n, true, ["a", "b", "c"]]]);
  });

  it("a database that does not exist (NOT_FOUND) is skipped, as with Changes", async () => {
    const server = seeded();
    const h = harness(server, { databases: ["ghost"] });
    h.client.start();
    await live(h);
    assert.deepEqual(server.snapshotRequests.map((r) => r.database), ["ghost"]);
    assert.deepEqual(server.changesRequests, []);
    assert.deepEqual(h.batches, []);
  });

  it("a stale position of a re-created database reloads it with a Snapshot (database_created_seq)", async () => {
    const server = new FakeServer();
    server.seq = 20n;
    server.createDatabase("cars", KEY); // created_seq 20
    server.put("cars", "g", {}); // 21
    const store = new MemoryStateStore({ syncKeys: [KEY], seq: 20n, databases: { cars: 9n } });
    const h = harness(server, {}, store);
    h.client.start();
    await waitFor(() => store.get()?.seq === 21n, "caught up");
    assert.deepEqual(server.changesRequests.map((r) => r.since), [9n, 21n]);
    assert.equal(server.snapshotRequests.length, 1);
    assert.deepEqual(h.batches.map((b) => [b.since, b.lastSeq, b.reset, ids(b)]), [[0n, 21n, true, ["g"]]]);
    assert.deepEqual(store.get()?.databases, { cars: 21n });
  });

  it("OUT_OF_RANGE: the resync reloads with a Snapshot", async () => {
    const server = seeded();
    server.oldestSeq = 3n;
    const store = new MemoryStateStore({ syncKeys: [KEY], seq: 1n, databases: { cars: 1n } });
    const h = harness(server, {}, store);
    h.client.start();
    await live(h);
    assert.equal(h.resyncs.length, 1);
    assert.deepEqual(server.snapshotRequests.map((r) => r.database), ["cars"]);
    assert.deepEqual(h.batches.map((b) => [b.since, b.reset, ids(b)]), [[0n, true, ["a", "b", "c"]]]);
    assert.deepEqual(store.get(), { syncKeys: [KEY], seq: 4n, databases: { cars: 4n } });
  });

  it("an app callback that throws mid-snapshot: after the reconnect, Changes from the last batch it took", async () => {
    const server = seeded();
    server.snapshotMessageBytes = TWO_PER_MESSAGE;
    let failures = 1;
    const seen: [bigint, string[]][] = [];
    const h = harness(server, {
      onChanges: (batch) => {
        seen.push([batch.since, ids(batch)]);
        if (batch.since === 2n && failures-- > 0) throw new Error("disk full");
      },
    });
    h.client.start();
    await live(h);
    assert.deepEqual(seen, [
      [0n, ["a", "b"]],
      [2n, ["c"]], // the snapshot's last message: throws
      [2n, ["c"]], // Changes from 2
    ]);
    assert.deepEqual(h.delays, [75]);
    assert.equal(server.snapshotRequests.length, 1);
    assert.deepEqual(server.changesRequests.map((r) => r.since), [2n, 3n]);
    assert.deepEqual(h.store.get(), { syncKeys: [KEY], seq: 4n, databases: { cars: 3n } });
    await waitFor(() => server.openSnapshots === 0, "the stream closed");
  });

  it("stop() during a snapshot closes the stream; start() goes on with Changes from the last batch", async () => {
    const server = seeded();
    server.snapshotMessageBytes = TWO_PER_MESSAGE;
    let stopping: Promise<void> | undefined;
    const batches: ChangesBatch[] = [];
    const h = harness(server, {
      onChanges: (batch) => {
        batches.push(batch);
        if (batches.length === 1) stopping = h.client.stop();
      },
    });
    h.client.start();
    await waitFor(() => stopping !== undefined, "the first batch");
    await stopping;
    assert.deepEqual(h.client.status, { state: "stopped", seq: undefined });
    await waitFor(() => server.openSnapshots === 0, "the server's stream ended");
    assert.deepEqual(h.store.get()?.databases, { cars: 2n });
    assert.deepEqual(server.changesRequests, []);
    h.client.start();
    await live(h);
    assert.equal(server.snapshotRequests.length, 1);
    assert.deepEqual(batches.map((b) => [b.since, b.lastSeq, b.reset, ids(b)]), [
      [0n, 2n, true, ["a", "b"]],
      [2n, 3n, false, ["c"]],
    ]);
    assert.deepEqual(h.store.get(), { syncKeys: [KEY], seq: 4n, databases: { cars: 3n } });
  });

  it("bodies: JSON text decoded, the same as the Struct an older server sends", async () => {
    const body = { n: 1.5, big: 9007199254740991, s: "é\u2028\"", nested: { z: [1, { y: null }], a: true }, empty: {} };
    const load = async (setup: (server: FakeServer) => void, options: Partial<SyncClientOptions> = {}) => {
      const server = new FakeServer();
      server.createDatabase("cars", KEY);
      server.put("cars", "a", body);
      server.put("cars", "e", {});
      setup(server);
      const h = harness(server, options);
      h.client.start();
      await live(h);
      server.put("cars", "b", body); // loaded with Changes
      await waitFor(() => h.store.get()?.seq === 3n, "loaded");
      return h.batches.flatMap((b) => b.changes.map((c) => [c.id, c.body]));
    };
    const want = [
      ["a", body],
      ["e", {}],
      ["b", body],
    ];
    assert.deepEqual(await load(() => {}), want, "Snapshot and Changes with body_json");
    assert.deepEqual(await load(() => {}, { snapshot: false }), want, "Changes with body_json");
    assert.deepEqual(
      await load((server) => {
        server.snapshotSupported = false;
        server.jsonBodies = false;
      }),
      want,
      "an older server: Struct bodies",
    );
  });
});
