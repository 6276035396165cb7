// The three-way merge and the default resolver: pure functions, table-driven.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import type { JsonObject, JsonValue } from "@bufbuild/protobuf";
import { fieldMerge, jsonEqual, mergeJson } from "../src/resolve.js";

describe("mergeJson", () => {
  const cases: [string, JsonValue | undefined, JsonValue | undefined, JsonValue | undefined, "remote" | "local", JsonValue | undefined][] = [
    ["disjoint fields combine", { a: 1, b: 1 }, { a: 2, b: 1 }, { a: 1, b: 3 }, "remote", { a: 2, b: 3 }],
    ["an overlap: the server wins", { a: 1 }, { a: 2 }, { a: 3 }, "remote", { a: 3 }],
    ["an overlap: local wins when preferred", { a: 1 }, { a: 2 }, { a: 3 }, "local", { a: 2 }],
    ["the same change on both sides", { a: 1 }, { a: 2 }, { a: 2 }, "remote", { a: 2 }],
    ["a field removed locally, kept remotely unchanged", { a: 1, b: 1 }, { a: 1 }, { a: 1, b: 1, c: 1 }, "remote", { a: 1, c: 1 }],
    ["removed locally, changed remotely: the server wins", { a: 1, b: 1 }, { a: 1 }, { a: 1, b: 2 }, "remote", { a: 1, b: 2 }],
    ["nested objects merge field by field", { o: { x: 1, y: 1 } }, { o: { x: 2, y: 1 } }, { o: { x: 1, y: 2 } }, "remote", { o: { x: 2, y: 2 } }],
    ["arrays are replaced whole", { l: [1] }, { l: [1, 2] }, { l: [0, 1] }, "remote", { l: [0, 1] }],
    ["a field added on both sides as objects merges", {}, { o: { x: 1 } }, { o: { y: 1 } }, "remote", { o: { x: 1, y: 1 } }],
    ["key order does not matter", { a: 1, b: 2 }, { b: 2, a: 1 }, { a: 1, b: 3 }, "remote", { a: 1, b: 3 }],
  ];
  for (const [what, base, local, remote, prefer, want] of cases) {
    it(what, () => assert.deepEqual(mergeJson(base, local, remote, prefer), want));
  }
});

describe("jsonEqual", () => {
  it("compares deeply, ignoring key order", () => {
    assert.equal(jsonEqual({ a: [1, { b: null }], c: "x" }, { c: "x", a: [1, { b: null }] }), true);
    assert.equal(jsonEqual({ a: 1 }, { a: 1, b: undefined as unknown as JsonValue }), false);
    assert.equal(jsonEqual([1, 2], [2, 1]), false);
    assert.equal(jsonEqual({}, []), false);
  });
});

describe("fieldMerge (the default resolver)", () => {
  const base: JsonObject = { title: "milk", done: false };
  const c = (local: JsonObject | undefined, remote: JsonObject | undefined) => ({ database: "d", id: "a", base, local, remote, remoteRev: remote ? "2-x" : "" });
  it("edit against edit: a field-level merge", async () => {
    assert.deepEqual(await fieldMerge()(c({ title: "milk", done: true }, { title: "oat milk", done: false })), { body: { title: "oat milk", done: true } });
  });
  it("edit against delete: rejected by default, written again with prefer: local", async () => {
    assert.deepEqual(await fieldMerge()(c({ title: "milk", done: true }, undefined)), { reject: "deleted on the server" });
    assert.deepEqual(await fieldMerge({ prefer: "local" })(c({ title: "milk", done: true }, undefined)), { body: { title: "milk", done: true } });
  });
  it("delete against edit: rejected by default, deleted with prefer: local; an unchanged server copy is deleted", async () => {
    assert.deepEqual(await fieldMerge()(c(undefined, { title: "milk", done: true })), { reject: "changed on the server" });
    assert.deepEqual(await fieldMerge({ prefer: "local" })(c(undefined, { title: "milk", done: true })), { delete: true });
    assert.deepEqual(await fieldMerge()(c(undefined, { done: false, title: "milk" })), { delete: true });
  });
});
