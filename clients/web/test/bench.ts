// Benchmarks of the replica in Node, against a real agsync server.
//
//   AGSYNC_BIN=../../target/release/agsync npm run bench
//
// 1. local write latency: `put` then read it back, 2000 times, in memory
//    and in SQLite: when it is visible (`get` returns it), when subscribers
//    hear of it, when it is stored (the promise resolves);
// 2. upload: 10,000 edits queued offline (10,000 new documents; then 10,000
//    edits of 1,000 documents, 10 each), then online: time until the outbox
//    is empty and every edit was acknowledged, in edits/s, for each store.
// Prints a markdown table (medians and p99) to paste into BENCHMARKS.md.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import { SyncService } from "../src/gen/agsync/v1/sync_pb.js";
import { openReplica, type Replica } from "../src/replica.js";
import { createAgsyncTransport } from "../src/transport.js";
import { memoryStore, type ReplicaStorage } from "../src/storage.js";
import { sqliteStore } from "../src/storage-sqlite.js";

const bin = process.env.AGSYNC_BIN;
if (!bin) {
  console.error("bench: set AGSYNC_BIN to the agsync binary");
  process.exit(2);
}
const dir = mkdtempSync(join(tmpdir(), "agsync-web-bench-"));
let server: ChildProcess | undefined;

function startServer(): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(bin!, ["--listen", "127.0.0.1:0", "--db", join(dir, "server.db")], { stdio: ["ignore", "ignore", "pipe"] });
    server = child;
    let out = "";
    child.stderr!.on("data", (c: Buffer) => {
      out += c.toString().replace(/\x1b\[[0-9;]*m/g, "");
      const m = out.match(/listening address=(127\.0\.0\.1:\d+)/);
      if (m) resolve(m[1]!);
    });
    child.on("exit", (code) => reject(new Error(`agsync exited (${code}): ${out}`)));
  });
}

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
}
const fmt = (ms: number) => (ms < 1 ? `${(ms * 1000).toFixed(0)} µs` : `${ms.toFixed(2)} ms`);

let offline = false;
function transport(address: string) {
  return createAgsyncTransport({
    baseUrl: `http://${address}`,
    fetch: (input, init) => (offline ? Promise.reject(new TypeError("fetch failed (offline)")) : fetch(input, init)),
  });
}

async function open(address: string, database: string, store: ReplicaStorage): Promise<Replica> {
  return openReplica({ transport: transport(address), databases: [database], store, coordination: "solo", backoff: { initialMs: 20, maxMs: 200 } });
}

const rows: string[] = [];

async function latency(address: string, name: string, store: ReplicaStorage): Promise<void> {
  const api = createClient(SyncService, transport(address));
  const database = `lat-${name.toLowerCase()}`;
  await api.createDatabase({ name: database });
  const replica = await open(address, database, store);
  await replica.whenSynced();
  let heard = 0;
  replica.subscribe((changes) => (heard += changes.length));
  const visible: number[] = [];
  const notified: number[] = [];
  const stored: number[] = [];
  const body = { title: "x".repeat(200), done: false, n: 0 };
  for (let i = 0; i < 2000; i++) {
    const id = `d${i % 200}`;
    const t0 = performance.now();
    const before = heard;
    const saving = replica.put(database, id, { ...body, n: i });
    if (replica.get(database, id)?.body.n !== i) throw new Error("not visible");
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
  for (const [what, xs] of [
    ["visible (`get` returns it)", visible],
    ["subscribers called", notified],
    ["stored (the `put` promise resolves)", stored],
  ] as const) {
    const s = [...xs].sort((a, b) => a - b);
    rows.push(`| local write, ${name}: ${what} | 2000 puts, 200 docs, online | ${fmt(quantile(s, 0.5))} | ${fmt(quantile(s, 0.99))} |`);
  }
}

async function upload(address: string, name: string, makeStore: () => ReplicaStorage, docs: number): Promise<void> {
  const api = createClient(SyncService, transport(address));
  const database = `up-${name.toLowerCase()}-${docs}`;
  await api.createDatabase({ name: database });
  const store = makeStore();
  const replica = await open(address, database, store);
  await replica.whenSynced();
  offline = true;
  for (let i = 0; i < 10_000; i++) {
    const id = `d${i % docs}`;
    await replica.put(database, id, { title: `todo ${i}`, done: i % 2 === 0, n: i });
  }
  const t0 = performance.now();
  offline = false;
  await replica.whenSynced();
  const ms = performance.now() - t0;
  await replica.close();
  const check = await api.changes({ database, since: 0n, limit: 1 });
  if (check.changes.length === 0) throw new Error("nothing uploaded");
  rows.push(`| upload of 10,000 offline edits, ${name} | ${docs === 10_000 ? "10,000 new docs" : `${docs} docs × ${10_000 / docs} edits`} | ${Math.round(10_000 / (ms / 1000)).toLocaleString("en")} edits/s | ${(ms / 1000).toFixed(2)} s total |`);
}

async function main(): Promise<void> {
  const address = await startServer();
  const only = process.env.BENCH_ONLY; // "latency" or "upload"
  if (only !== "upload") {
    await latency(address, "memory", memoryStore());
    await latency(address, "SQLite", sqliteStore(join(dir, "latency.db")));
  }
  let n = 0;
  if (only !== "latency") {
    const stores = process.env.BENCH_STORE ? [process.env.BENCH_STORE] : ["memory", "SQLite"];
    for (const docs of [10_000, 1_000]) {
      if (stores.includes("memory")) await upload(address, "memory", () => memoryStore(), docs);
      if (stores.includes("SQLite")) await upload(address, "SQLite", () => sqliteStore(join(dir, `up${n++}.db`)), docs);
    }
  }
  console.log("| what | workload | median / rate | p99 / total |");
  console.log("|---|---|---|---|");
  for (const row of rows) console.log(row);
}

main()
  .catch((err) => {
    console.error(err);
    process.exitCode = 1;
  })
  .finally(() => {
    server?.kill("SIGTERM");
    rmSync(dir, { recursive: true, force: true });
  });
