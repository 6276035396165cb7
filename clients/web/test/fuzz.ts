// Convergence fuzz: the real client library against a real agsync server.
//
//   AGSYNC_BIN=../../target/release/agsync npm run test:fuzz
//   FUZZ_SEED=1234 ...      replays a run (the seed is printed first, and again with a failure)
//   FUZZ_CLIENTS=20 FUZZ_OPS=400 FUZZ_DOCS=20   the defaults
//
// Starts agsync on 127.0.0.1 (a fresh --db in a temp dir), creates database
// "fuzz" with FUZZ_DOCS documents, then opens FUZZ_CLIENTS replicas, each on
// its own SQLite file (better-sqlite3) and its own gRPC-Web transport, and
// runs FUZZ_OPS random steps: edits (each puts a unique marker into the
// client's own field, sometimes into the shared "title"), deletes, reads,
// offline periods (the client's calls fail and its stream is cut), client
// restarts (close and reopen on the same file: a reload), and once, halfway,
// a kill -9 of the server and a restart on the same --db and port.
// Then every client goes online and syncs, and it checks:
//   1. every client's replica equals the server's documents (ids, revs, bodies), nothing pending;
//   2. each edit is accounted for exactly once: applied, merged (into a write
//      that is itself accounted for), or reported rejected;
//   3. at most once: per document, the server's revision generation is the
//      number of writes the clients were told were applied (plus the setup's):
//      a write executed twice, or executed without its client hearing of it,
//      would show as a larger generation;
//   4. no rejected edit's marker is in any server document.
// Prints one line per check and "N passed, N failed"; exits 1 on a failure.
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { JsonObject } from "@bufbuild/protobuf";
import { createClient } from "@connectrpc/connect";
import { SyncService } from "../src/gen/agsync/v1/sync_pb.js";
import { openReplica, type Replica } from "../src/replica.js";
import { createAgsyncTransport } from "../src/transport.js";
import { sqliteStore } from "../src/storage-sqlite.js";
import type { Rejection, WriteOutcome } from "../src/outbox.js";

const seed = Number(process.env.FUZZ_SEED ?? Math.floor(Math.random() * 2 ** 31));
const CLIENTS = Number(process.env.FUZZ_CLIENTS ?? 20);
const OPS = Number(process.env.FUZZ_OPS ?? 400);
const DOCS = Number(process.env.FUZZ_DOCS ?? 20);
const DB = "fuzz";
const DEADLINE_MS = Number(process.env.FUZZ_TIMEOUT_MS ?? 150_000);
const bin = process.env.AGSYNC_BIN;

console.log(`fuzz: seed=${seed} clients=${CLIENTS} ops=${OPS} docs=${DOCS} (replay: FUZZ_SEED=${seed} npm run test:fuzz)`);
if (!bin) {
  console.error("fuzz: set AGSYNC_BIN to the agsync binary (cargo build --release)");
  console.log("0 passed, 1 failed");
  process.exit(2);
}

/** mulberry32: a small seeded PRNG. */
function prng(s: number): () => number {
  let a = s >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const random = prng(seed);
const pick = (n: number) => Math.floor(random() * n);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// ---- the server ------------------------------------------------------------------

const dir = mkdtempSync(join(tmpdir(), "agsync-fuzz-"));
let server: ChildProcess | undefined;
let address = "";

function startServer(listen: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(bin!, ["--listen", listen, "--db", join(dir, "server.db"), "--cors-allow-origin", "*"], {
      stdio: ["ignore", "ignore", "pipe"],
      env: { ...process.env, RUST_LOG: "agsync=info" },
    });
    server = child;
    let output = "";
    const timer = setTimeout(() => reject(new Error(`agsync did not start in 15 s:\n${output}`)), 15_000);
    child.stderr!.on("data", (chunk: Buffer) => {
      output += chunk.toString().replace(/\x1b\[[0-9;]*m/g, "");
      const match = output.match(/listening address=(127\.0\.0\.1:\d+)/);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]!);
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`agsync exited (${code}) before listening:\n${output}`));
    });
  });
}

async function killServer(): Promise<void> {
  const child = server;
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once("exit", r));
  child.kill("SIGKILL");
  await exited;
}

const admin = () => createClient(SyncService, createAgsyncTransport({ baseUrl: `http://${address}` }));

// ---- the clients -------------------------------------------------------------------

interface Edit {
  marker: string;
  client: number;
  doc: string;
  op: "put" | "delete";
  requestId: string;
}

interface Sim {
  n: number;
  file: string;
  replica: Replica | undefined;
  offline: boolean;
  offlineUntil: number;
  aborts: Set<AbortController>;
  restarts: number;
}

const edits = new Map<string, Edit>(); // by request id
const outcomes = new Map<string, WriteOutcome[]>(); // by request id
const rejections: Rejection[] = [];
const problems: string[] = [];

function clientFetch(sim: Sim): typeof fetch {
  return async (input, init) => {
    if (sim.offline) throw new TypeError("fetch failed (the fuzz client is offline)");
    const url = String(input instanceof Request ? input.url : input).replace(/^http:\/\/[^/]+/, `http://${address}`);
    const abort = new AbortController();
    sim.aborts.add(abort);
    const signal = init?.signal ? AbortSignal.any([init.signal, abort.signal]) : abort.signal;
    return fetch(url, { ...init, signal });
  };
}

async function openSim(sim: Sim): Promise<void> {
  sim.replica = await openReplica({
    transport: createAgsyncTransport({ baseUrl: `http://${address}`, fetch: clientFetch(sim) }),
    databases: [DB],
    store: sqliteStore(sim.file),
    coordination: "solo",
    backoff: { initialMs: 50, maxMs: 400 },
    callTimeoutMs: 5000,
    maxBatch: 8,
    onOutcome: (o) => {
      const list = outcomes.get(o.requestId) ?? [];
      list.push(o);
      outcomes.set(o.requestId, list);
      if (o.kind === "merged" && o.replacedBy) {
        const from = edits.get(o.requestId);
        if (from) edits.set(o.replacedBy, { ...from, requestId: o.replacedBy, marker: `${from.marker}~merged` });
      }
    },
    onRejected: (r) => {
      rejections.push(r);
      return "drop";
    },
  });
}

function goOffline(sim: Sim, steps: number, step: number): void {
  sim.offline = true;
  sim.offlineUntil = step + steps;
  for (const abort of sim.aborts) abort.abort();
  sim.aborts.clear();
}

// ---- the run -------------------------------------------------------------------------

let passed = 0;
let failed = 0;
function check(what: string, fn: () => void): void {
  try {
    fn();
    passed += 1;
    console.log(`ok: ${what}`);
  } catch (err) {
    failed += 1;
    console.log(`FAIL: ${what}\n  ${String((err as Error)?.message ?? err).split("\n").slice(0, 30).join("\n  ")}`);
  }
}

function generation(rev: string): number {
  return Number(rev.split("-")[0]);
}

async function main(): Promise<void> {
  address = await startServer("127.0.0.1:0");
  console.log(`agsync at ${address} (${dir})`);
  const api = admin();
  await api.createDatabase({ name: DB });
  const ids = Array.from({ length: DOCS }, (_, i) => `doc${String(i).padStart(2, "0")}`);
  await api.bulkPut({ database: DB, docs: ids.map((id) => ({ id, body: { title: `doc ${id}` } })) });

  const sims: Sim[] = Array.from({ length: CLIENTS }, (_, n) => ({
    n,
    file: join(dir, `client${n}.db`),
    replica: undefined,
    offline: false,
    offlineUntil: 0,
    aborts: new Set(),
    restarts: 0,
  }));
  await Promise.all(sims.map(openSim));
  let serverRestarts = 0;
  let markers = 0;
  const t0 = Date.now();

  for (let step = 0; step < OPS; step++) {
    if (step === Math.floor(OPS / 2)) {
      // kill -9 mid-run, then the same --db on the same port.
      await killServer();
      await sleep(pick(500));
      const port = address.split(":")[1];
      try {
        address = await startServer(`127.0.0.1:${port}`);
      } catch {
        address = await startServer("127.0.0.1:0"); // the port was taken meanwhile: clients follow `address`
      }
      serverRestarts += 1;
      console.log(`step ${step}: server killed (-9) and restarted at ${address}`);
    }
    for (const sim of sims) if (sim.offline && step >= sim.offlineUntil) sim.offline = false;
    const sim = sims[pick(CLIENTS)]!;
    const replica = sim.replica!;
    const doc = ids[pick(DOCS)]!;
    const roll = random();
    if (roll < 0.55) {
      const view = replica.get(DB, doc);
      const marker = `c${sim.n}-m${markers++}`;
      const body: JsonObject = { ...(view?.body ?? {}), [`c${sim.n}`]: marker };
      if (random() < 0.3) body.title = marker;
      const receipt = await replica.put(DB, doc, body);
      edits.set(receipt.requestId, { marker, client: sim.n, doc, op: "put", requestId: receipt.requestId });
    } else if (roll < 0.62) {
      const receipt = await replica.delete(DB, doc);
      if (receipt) edits.set(receipt.requestId, { marker: `c${sim.n}-del${markers++}`, client: sim.n, doc, op: "delete", requestId: receipt.requestId });
    } else if (roll < 0.8) {
      const all = replica.all(DB);
      const pendingIds = new Set(replica.pendingWrites().map((w) => w.id));
      for (const d of all) {
        if (d.pending !== pendingIds.has(d.id)) problems.push(`client ${sim.n}: ${d.id} pending=${d.pending} but the outbox says ${pendingIds.has(d.id)}`);
      }
    } else if (roll < 0.9) {
      if (!sim.offline) goOffline(sim, 5 + pick(40), step);
    } else {
      // A reload: the replica is closed (calls in flight are cut) and opened again on its file.
      await replica.close();
      sim.restarts += 1;
      await openSim(sim);
    }
    await sleep(pick(8));
    if (Date.now() - t0 > DEADLINE_MS / 2) {
      console.log(`step ${step}: the random phase is over its time budget; stopping it here`);
      break;
    }
  }
  const writes = [...edits.values()].length;
  console.log(
    `random phase: ${Date.now() - t0} ms, ${writes} edits, ${sims.reduce((n, s) => n + s.restarts, 0)} client restarts, ${serverRestarts} server restart(s)`,
  );

  // Everyone back online, in sync.
  for (const sim of sims) sim.offline = false;
  const syncStart = Date.now();
  const remaining = Math.max(10_000, DEADLINE_MS - (Date.now() - t0));
  try {
    await Promise.all(sims.map((sim) => sim.replica!.whenSynced({ signal: AbortSignal.timeout(remaining) })));
  } catch {
    const stuck = sims.filter((s) => s.replica!.status.pending > 0 || s.replica!.status.stream !== "live");
    problems.push(
      `not synced after ${remaining} ms: ${stuck.map((s) => `client ${s.n} (${JSON.stringify({ ...s.replica!.status, lastSyncedSeq: String(s.replica!.status.lastSyncedSeq) })})`).join("; ")}`,
    );
  }
  // A second round: writes of the last uploads reach every client.
  await Promise.all(sims.map((sim) => sim.replica!.whenSynced({ signal: AbortSignal.timeout(20_000) }).catch(() => undefined)));
  console.log(`converged in ${Date.now() - syncStart} ms`);

  // The server's truth: every document, deleted ones too (for generations).
  const server = new Map<string, { rev: string; deleted: boolean; body: JsonObject | undefined }>();
  for (let since = 0n; ; ) {
    const page = await admin().changes({ database: DB, since, includeDocs: true, limit: 1000 });
    if (page.changes.length === 0) break;
    for (const c of page.changes) server.set(c.id, { rev: c.rev, deleted: c.deleted, body: c.deleted ? undefined : ((c.body ?? {}) as JsonObject) });
    since = page.lastSeq;
  }
  const live = [...server].filter(([, d]) => !d.deleted).sort(([a], [b]) => (a < b ? -1 : 1));

  check("no inconsistency seen during the run (pending flags match the outbox)", () => assert.deepEqual(problems, []));

  check(`every client's replica equals the server's ${live.length} live documents, nothing pending`, () => {
    const want = live.map(([id, d]) => [id, d.rev, d.body]);
    for (const sim of sims) {
      const got = sim.replica!.all(DB).map((d) => [d.id, d.rev, d.body]);
      assert.deepEqual(got, want, `client ${sim.n} differs`);
      assert.equal(sim.replica!.status.pending, 0, `client ${sim.n} has pending edits`);
      assert.ok(sim.replica!.all(DB).every((d) => !d.pending));
    }
  });

  check(`each of the ${writes} edits is accounted for exactly once (applied, merged or rejected)`, () => {
    const missing: string[] = [];
    const twice: string[] = [];
    for (const edit of edits.values()) {
      const list = outcomes.get(edit.requestId) ?? [];
      if (list.length === 0) missing.push(`${edit.marker} (${edit.op} ${edit.doc}, ${edit.requestId})`);
      if (list.length > 1) twice.push(`${edit.marker}: ${list.map((o) => o.kind).join(", ")}`);
    }
    assert.deepEqual({ missing, twice }, { missing: [], twice: [] });
  });

  const applied = new Map<string, number>();
  for (const list of outcomes.values()) for (const o of list) if (o.kind === "applied") applied.set(o.id, (applied.get(o.id) ?? 0) + 1);
  check("at most once: each document's generation is 1 (setup) + the writes its clients were told were applied", () => {
    const wrong: string[] = [];
    for (const [id, d] of server) {
      const expected = 1 + (applied.get(id) ?? 0);
      if (generation(d.rev) !== expected) wrong.push(`${id}: generation ${generation(d.rev)}, ${expected - 1} acknowledged writes + setup`);
    }
    assert.deepEqual(wrong, []);
  });

  check(`no rejected edit's content is on the server (${rejections.length} rejected)`, () => {
    const text = JSON.stringify(live.map(([, d]) => d.body));
    const leaked = rejections
      .filter((r) => r.op === "put")
      .map((r) => edits.get(r.requestId)?.marker)
      .filter((m): m is string => m !== undefined && !m.includes("~") && text.includes(`"${m}"`));
    assert.deepEqual(leaked, []);
  });

  const kinds = new Map<string, number>();
  for (const list of outcomes.values()) for (const o of list) kinds.set(o.kind, (kinds.get(o.kind) ?? 0) + 1);
  console.log(`outcomes: ${[...kinds].map(([k, n]) => `${n} ${k}`).join(", ")}`);
  await Promise.all(sims.map((sim) => sim.replica!.close()));
}

const overall = setTimeout(() => {
  console.log(`FAIL: the fuzz run took longer than ${DEADLINE_MS + 30_000} ms (seed ${seed})`);
  console.log(`${passed} passed, ${failed + 1} failed`);
  void killServer().finally(() => process.exit(1));
}, DEADLINE_MS + 30_000);

main()
  .catch((err) => {
    failed += 1;
    console.log(`FAIL: ${(err as Error)?.stack ?? err}`);
  })
  .finally(async () => {
    clearTimeout(overall);
    await killServer();
    rmSync(dir, { recursive: true, force: true });
    if (failed > 0) console.log(`FAIL: fuzz seed ${seed}; replay with FUZZ_SEED=${seed} AGSYNC_BIN=... npm run test:fuzz`);
    console.log(`${passed} passed, ${failed} failed`);
    process.exit(failed > 0 ? 1 : 0);
  });
