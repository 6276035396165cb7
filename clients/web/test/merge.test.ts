// putWithMerge against the in-memory server, conflictOf, overlayChanges.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import type { JsonObject } from "@bufbuild/protobuf";
import { conflictOf } from "../src/errors.js";
import { SyncService, type Document } from "../src/gen/agsync/v1/sync_pb.js";
import { overlayChanges, putWithMerge } from "../src/merge.js";
import { FakeServer } from "./fake-server.js";

function setup() {
  const server = new FakeServer();
  server.createDatabase("cars");
  const api = createClient(SyncService, server.transport());
  return { server, api };
}

describe("putWithMerge", () => {
  it("without a conflict, puts once", async () => {
    const { server, api } = setup();
    const res = await putWithMerge(api, "cars", { id: "m", body: { model: "Mustang" } }, () => {
      throw new Error("merge must not be called");
    });
    assert.deepEqual([res.id, res.rev.split("-")[0], res.seq, res.attempts, res.body], ["m", "1", 1n, 1, { model: "Mustang" }]);
    assert.equal(server.putRequests.length, 1);
  });

  it("on a conflict, merges with the current document from the error details and retries with its rev", async () => {
    const { server, api } = setup();
    const v1 = server.put("cars", "m", { model: "Mustang", year: 1969 });
    const v2 = server.put("cars", "m", { model: "Mustang", year: 1969, color: "red" });
    const calls: [JsonObject, Document | undefined][] = [];
    const res = await putWithMerge(api, "cars", { id: "m", rev: v1.rev, body: { model: "Mustang", year: 1970 } }, (mine, theirs) => {
      calls.push([mine, theirs]);
      return { ...theirs!.body, year: mine["year"]! };
    });
    assert.equal(calls.length, 1);
    assert.deepEqual(calls[0]![0], { model: "Mustang", year: 1970 });
    assert.deepEqual(
      [calls[0]![1]?.id, calls[0]![1]?.rev, calls[0]![1]?.seq, calls[0]![1]?.body],
      ["m", v2.rev, v2.seq, { model: "Mustang", year: 1969, color: "red" }],
    );
    assert.deepEqual(server.putRequests.map((p) => p.rev), [v1.rev, v2.rev]);
    assert.equal(res.attempts, 2);
    assert.deepEqual(res.body, { model: "Mustang", year: 1970, color: "red" });
    assert.deepEqual(server.dbs.get("cars")!.docs.get("m")!.body, { model: "Mustang", year: 1970, color: "red" });
    assert.ok(res.rev.startsWith("3-"));
  });

  it("a create that conflicts with a live document merges with it", async () => {
    const { server, api } = setup();
    server.put("cars", "m", { a: 1 });
    const res = await putWithMerge(api, "cars", { id: "m", body: { b: 2 } }, (mine, theirs) => ({ ...theirs!.body, ...mine }));
    assert.deepEqual([res.attempts, res.body], [2, { a: 1, b: 2 }]);
  });

  it("gives up after maxAttempts Puts, throwing the last conflict", async () => {
    const { server, api } = setup();
    server.put("cars", "m", { n: 0 });
    server.alwaysConflict = true;
    let merges = 0;
    await assert.rejects(
      putWithMerge(api, "cars", { id: "m", rev: "1-x", body: { n: 1 } }, (mine, theirs) => (merges++, { ...theirs!.body, ...mine }), {
        maxAttempts: 3,
      }),
      (err: unknown) => {
        const conflict = conflictOf(err);
        assert.ok(conflict, "the error is a conflict");
        assert.equal(conflict.currentRev, server.dbs.get("cars")!.docs.get("m")!.rev);
        return true;
      },
    );
    assert.equal(server.putRequests.length, 3);
    assert.equal(merges, 2);
  });

  it("gives up when merge returns undefined", async () => {
    const { server, api } = setup();
    server.put("cars", "m", { n: 0 });
    await assert.rejects(
      putWithMerge(api, "cars", { id: "m", rev: "9-stale", body: { n: 1 } }, () => undefined),
      (err: unknown) => err instanceof ConnectError && err.code === Code.Aborted,
    );
    assert.equal(server.putRequests.length, 1);
  });

  it("throws other errors at once", async () => {
    const { api } = setup();
    let merges = 0;
    await assert.rejects(
      putWithMerge(api, "nope", { id: "m", body: {} }, () => (merges++, {})),
      (err: unknown) => err instanceof ConnectError && err.code === Code.NotFound,
    );
    assert.equal(merges, 0);
  });
});

describe("conflictOf", () => {
  it("is undefined for errors that are not agsync conflicts", () => {
    assert.equal(conflictOf(new Error("x")), undefined);
    assert.equal(conflictOf(new ConnectError("gone", Code.NotFound)), undefined);
    assert.equal(conflictOf(new ConnectError("aborted without details", Code.Aborted)), undefined);
  });
});

describe("overlayChanges", () => {
  it("lays the fields you changed or removed over theirs; theirs keep the rest", () => {
    const base = { model: "Mustang", year: 1969, owner: { name: "Ann" }, seats: 4 };
    const mine = { model: "Mustang", year: 1970, owner: { name: "Ann" }, wheels: 4 };
    const theirs = { model: "Mustang GT", year: 1969, owner: { name: "Bob" }, seats: 2, color: "red" };
    assert.deepEqual(overlayChanges(base, mine, theirs), {
      model: "Mustang GT",
      year: 1970,
      owner: { name: "Bob" },
      color: "red",
      wheels: 4,
    });
  });

  it("compares nested values whatever their key order", () => {
    const base = { o: { a: 1, b: 2 } };
    const mine = { o: { b: 2, a: 1 } };
    assert.deepEqual(overlayChanges(base, mine, { o: { a: 5 } }), { o: { a: 5 } });
  });
});
