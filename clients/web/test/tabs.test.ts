// Many tabs on one storage: one leader holds the connection (a lock, like
// Web Locks), the others follow through the shared storage and a
// BroadcastChannel (Node's, in-process). Writes from any tab enter the one
// outbox, every tab sees every change, and when the leader closes another
// takes over: never two streams at once.
import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";
import { openReplica, type Coordination, type Replica } from "../src/replica.js";
import { memoryStore, type ReplicaStorage } from "../src/storage.js";
import { FakeServer, waitFor } from "./fake-server.js";

const DB = "todos";

/** navigator.locks.request, in one process: FIFO per name. */
class FakeLocks {
  readonly #held = new Set<string>();
  readonly #queues = new Map<string, (() => void)[]>();
  lock(name: string, fn: () => Promise<void>): Promise<void> {
    return new Promise((resolve, reject) => {
      const run = () => {
        this.#held.add(name);
        fn()
          .then(resolve, reject)
          .finally(() => {
            this.#held.delete(name);
            this.#queues.get(name)?.shift()?.();
          });
      };
      if (!this.#held.has(name)) run();
      else {
        const queue = this.#queues.get(name) ?? [];
        queue.push(run);
        this.#queues.set(name, queue);
      }
    });
  }
}

const open: Replica[] = [];
afterEach(async () => {
  await Promise.all(open.splice(0).map((r) => r.close()));
});

async function tab(server: FakeServer, store: ReplicaStorage, coordination: Coordination): Promise<Replica> {
  const replica = await openReplica({
    transport: server.transport(),
    databases: [DB],
    store,
    coordination,
    backoff: { initialMs: 20, maxMs: 100 },
  });
  open.push(replica);
  return replica;
}

describe("Replica in many tabs", () => {
  it("one leader and one stream; a follower's writes are uploaded; everyone sees everything; the next tab takes over", async () => {
    const server = new FakeServer();
    server.createDatabase(DB);
    server.put(DB, "a", { title: "milk" });
    const store = memoryStore({ sharedName: "app" });
    const locks = new FakeLocks();
    const coordination: Coordination = { lock: (n, fn) => locks.lock(n, fn), channel: (n) => new BroadcastChannel(n) as never };
    const first = await tab(server, store, coordination);
    const second = await tab(server, store, coordination);
    await waitFor(() => first.status.stream === "live" && second.status.stream === "live", "both tabs to know the stream is live");
    assert.deepEqual([first.status.leader, second.status.leader], [true, false]);
    assert.equal(server.openStreams, 1);
    await waitFor(() => second.get(DB, "a") !== undefined, "the follower to see the leader's pull");

    // A write in the follower: visible there at once, in the leader soon, uploaded by the leader.
    await second.put(DB, "b", { title: "eggs" });
    assert.equal(second.get(DB, "b")?.pending, true);
    await waitFor(() => server.doc(DB, "b") !== undefined, "the follower's edit on the server");
    await waitFor(() => first.get(DB, "b")?.pending === false && second.get(DB, "b")?.pending === false, "both tabs to see it applied");
    assert.equal(second.status.pending, 0);

    // A remote change reaches both.
    server.put(DB, "a", { title: "oat milk" });
    await waitFor(() => first.get(DB, "a")?.body.title === "oat milk" && second.get(DB, "a")?.body.title === "oat milk", "both tabs to see it");

    // The leader closes: the follower takes over within 2 s, with a stream of its own.
    const t0 = Date.now();
    await first.close();
    open.splice(open.indexOf(first), 1);
    await waitFor(() => second.status.leader && second.status.stream === "live", "the follower to lead", 2000);
    assert.ok(Date.now() - t0 < 2000);
    await waitFor(() => server.openStreams === 1, "one stream (the old one closed, the new one open)");
    await second.put(DB, "c", { title: "bread" });
    await second.whenSynced();
    assert.deepEqual(server.doc(DB, "c")?.body, { title: "bread" });
  });

  it("edits of one document from two tabs go out in order, each based on the one before", async () => {
    const server = new FakeServer();
    server.createDatabase(DB);
    server.put(DB, "a", { title: "milk", n: 0 });
    const store = memoryStore({ sharedName: "order" });
    const locks = new FakeLocks();
    const coordination: Coordination = { lock: (n, fn) => locks.lock(n, fn), channel: (n) => new BroadcastChannel(n) as never };
    const leader = await tab(server, store, coordination);
    const follower = await tab(server, store, coordination);
    await leader.whenSynced();
    await waitFor(() => follower.get(DB, "a") !== undefined, "the follower to have a");
    server.failWrites = 1_000_000;
    for (let n = 1; n <= 6; n++) {
      const replica = n % 2 ? leader : follower;
      await replica.put(DB, "a", { ...replica.get(DB, "a")!.body, n });
      await waitFor(() => leader.get(DB, "a")?.body.n === n && follower.get(DB, "a")?.body.n === n, `edit ${n} in both tabs`);
    }
    server.failWrites = 0;
    await leader.whenSynced();
    assert.deepEqual(server.doc(DB, "a")?.body, { title: "milk", n: 6 });
    assert.equal(Number(server.doc(DB, "a")!.rev.split("-")[0]), 7);
  });
});
