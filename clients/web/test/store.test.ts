// The state stores and the backoff schedule.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { backoffDelay } from "../src/backoff.js";
import { LocalStorageStateStore, MemoryStateStore, parseStoredState } from "../src/store.js";

class FakeStorage implements Storage {
  readonly map = new Map<string, string>();
  get length() {
    return this.map.size;
  }
  clear() {
    this.map.clear();
  }
  getItem(key: string) {
    return this.map.get(key) ?? null;
  }
  key(i: number) {
    return [...this.map.keys()][i] ?? null;
  }
  removeItem(key: string) {
    this.map.delete(key);
  }
  setItem(key: string, value: string) {
    this.map.set(key, value);
  }
}

describe("LocalStorageStateStore", () => {
  it("round-trips 64-bit seqs as strings under its key", () => {
    const storage = new FakeStorage();
    const store = new LocalStorageStateStore("k", storage);
    assert.equal(store.get(), undefined);
    const big = 2n ** 63n - 1n;
    store.set({ syncKeys: ["a", "b"], seq: big, databases: { cars: 7n } });
    assert.equal(storage.getItem("k"), `{"v":1,"syncKeys":["a","b"],"seq":"${big}","databases":{"cars":"7"}}`);
    assert.deepEqual(store.get(), { syncKeys: ["a", "b"], seq: big, databases: { cars: 7n } });
    store.set({ syncKeys: ["a"], seq: undefined, databases: {} });
    assert.deepEqual(store.get(), { syncKeys: ["a"], seq: undefined, databases: {} });
    store.clear();
    assert.equal(storage.getItem("k"), null);
  });

  it("reads anything unreadable as no state", () => {
    for (const text of ["", "{", "null", "[]", '{"v":2,"syncKeys":[],"seq":null,"databases":{}}', '{"v":1,"syncKeys":[],"seq":"-1","databases":{}}', '{"v":1,"syncKeys":[],"seq":null,"databases":{"a":7}}']) {
      assert.equal(parseStoredState(text), undefined, text);
    }
  });
});

describe("MemoryStateStore", () => {
  it("hands out copies", () => {
    const store = new MemoryStateStore();
    const state = { syncKeys: ["a"], seq: 1n, databases: { x: 1n } };
    store.set(state);
    state.databases.x = 9n;
    const got = store.get()!;
    got.databases.x = 8n;
    assert.deepEqual(store.get(), { syncKeys: ["a"], seq: 1n, databases: { x: 1n } });
  });
});

describe("backoffDelay", () => {
  it("grows exponentially to the cap, using the upper half of each ceiling", () => {
    const opts = { initialMs: 500, maxMs: 30_000 };
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 7, 20].map((n) => backoffDelay(n, opts, () => 0)), [250, 500, 1000, 2000, 4000, 8000, 15000, 15000, 15000]);
    assert.deepEqual([0, 1, 6, 20].map((n) => backoffDelay(n, opts, () => 0.999999)), [500, 1000, 30000, 30000]);
    for (let i = 0; i < 100; i += 1) {
      const d = backoffDelay(0);
      assert.ok(d >= 250 && d <= 500, `default first delay ${d} in [250, 500]`);
    }
  });
});
