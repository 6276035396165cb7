// The replica in Chromium, on IndexedDB: the store's conformance checks and
// the browser benchmarks, against a real agsync server.
//
//   AGSYNC_BIN=$PWD/../../target/release/agsync npm run test:idb
//   IDB_LOAD_DOCS=100000 (default) IDB_UPLOAD_EDITS=10000 IDB_LATENCY_PUTS=1000: the sizes
//   IDB_PROFILE=load.cpuprofile: a CPU profile of the initial load, and the transactions' times
//
// Bundles test/idb-page.ts (esbuild), serves it on 127.0.0.1, starts agsync
// with --cors-allow-origin '*', seeds the databases with a Node client, and
// runs in headless Chromium (playwright-core, /usr/bin/chromium):
//   1. the IndexedDB store passes the storage conformance checks;
//   2. local write latency: visible at once (p99 under 10 ms), subscribers
//      called, stored in IndexedDB (the put's promise);
//   3. the upload of IDB_UPLOAD_EDITS edits queued offline, in edits/s;
//   4. the initial load of IDB_LOAD_DOCS documents of 1 KB into an empty
//      replica, in docs/s, and reading them back from IndexedDB (a reload).
// Prints one line per check, a markdown table of the numbers, and
// "N passed, N failed". Bounded by a timeout; stops what it started.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { build } from "esbuild";
import { chromium } from "playwright-core";
import { SyncService, createClient } from "@agsync/web";

const here = dirname(fileURLToPath(import.meta.url));
const LOAD_DOCS = Number(process.env.IDB_LOAD_DOCS ?? 100_000);
const UPLOAD_EDITS = Number(process.env.IDB_UPLOAD_EDITS ?? 10_000);
const LATENCY_PUTS = Number(process.env.IDB_LATENCY_PUTS ?? 1000);
const TIMEOUT_MS = Number(process.env.IDB_TIMEOUT_MS ?? 600_000);
const agsyncBin = process.env.AGSYNC_BIN;
const chromiumBin = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";
if (!agsyncBin || !existsSync(agsyncBin)) {
  console.error("replica-idb: set AGSYNC_BIN to the agsync binary");
  console.log("0 passed, 1 failed");
  process.exit(2);
}

const dir = mkdtempSync(join(tmpdir(), "agsync-idb-"));
let server;
let pageServer;
let browser;
let passed = 0;
let failed = 0;
const rows = [];

async function check(what, fn) {
  const t0 = Date.now();
  try {
    const detail = await fn();
    passed += 1;
    console.log(`ok: ${what}${detail ? ` (${detail})` : ""} [${Date.now() - t0} ms]`);
  } catch (err) {
    failed += 1;
    console.log(`FAIL: ${what}\n  ${String(err?.stack ?? err).split("\n").join("\n  ")}`);
  }
}

function quantile(xs, q) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
}
const fmt = (ms) => (ms < 1 ? `${Math.round(ms * 1000)} µs` : `${ms.toFixed(2)} ms`);

function startServer() {
  return new Promise((resolve, reject) => {
    server = spawn(agsyncBin, ["--listen", "127.0.0.1:0", "--db", join(dir, "agsync.db"), "--cors-allow-origin", "*"], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    let out = "";
    server.stderr.on("data", (c) => {
      out += c.toString().replace(/\x1b\[[0-9;]*m/g, "");
      const m = out.match(/listening address=(127\.0\.0\.1:\d+)/);
      if (m) resolve(`http://${m[1]}`);
    });
    server.on("exit", (code) => reject(new Error(`agsync exited (${code}): ${out}`)));
  });
}

async function servePage() {
  const result = await build({
    entryPoints: [join(here, "idb-page.ts")],
    bundle: true,
    format: "esm",
    platform: "browser",
    target: ["es2022"],
    write: false,
    logLevel: "warning",
  });
  const js = result.outputFiles[0].text;
  const html = '<!doctype html><meta charset="utf-8"><title>replica-idb</title><script type="module" src="page.js"></script>';
  pageServer = createServer((req, res) => {
    if (req.url === "/page.js") res.writeHead(200, { "content-type": "text/javascript" }).end(js);
    else res.writeHead(200, { "content-type": "text/html" }).end(html);
  });
  await new Promise((r) => pageServer.listen(0, "127.0.0.1", r));
  return `http://127.0.0.1:${pageServer.address().port}/`;
}

async function main() {
  const serverUrl = await startServer();
  const pageUrl = await servePage();
  const node = createClient(SyncService, createGrpcTransport({ baseUrl: serverUrl }));
  for (const name of ["lat", "up", "load"]) await node.createDatabase({ name });
  const seedStart = Date.now();
  const filler = "x".repeat(960);
  for (let i = 0; i < LOAD_DOCS; i += 1000) {
    const docs = [];
    for (let j = i; j < Math.min(LOAD_DOCS, i + 1000); j++) docs.push({ id: `doc${String(j).padStart(6, "0")}`, body: { title: `document ${j}`, n: j, text: filler } });
    const { results } = await node.bulkPut({ database: "load", docs });
    assert.ok(results.every((r) => r.error === ""));
  }
  console.log(`agsync at ${serverUrl}; page at ${pageUrl}; seeded ${LOAD_DOCS} documents of ~1 KB in ${Date.now() - seedStart} ms`);

  browser = await chromium.launch({
    executablePath: chromiumBin,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));
  await page.goto(pageUrl);
  await page.locator('body[data-ready="true"]').waitFor({ state: "attached", timeout: 15_000 });
  const chromeVersion = browser.version();

  await check("the IndexedDB store passes the storage conformance checks", async () => {
    const names = await page.evaluate(() => window.bench.conformance());
    return names.join("; ");
  });

  await check(`a local write is visible at once: p99 under 10 ms (${LATENCY_PUTS} puts, IndexedDB)`, async () => {
    const r = await page.evaluate(([url, n]) => window.bench.writeLatency(url, "lat", n), [serverUrl, LATENCY_PUTS]);
    for (const [what, xs] of [
      ["visible (`get` returns it)", r.visible],
      ["subscribers called", r.notified],
      ["stored in IndexedDB (the `put` promise resolves)", r.stored],
    ]) {
      rows.push(`| local write, IndexedDB: ${what} | ${LATENCY_PUTS} puts, 200 docs, online | ${fmt(quantile(xs, 0.5))} | ${fmt(quantile(xs, 0.99))} |`);
    }
    assert.ok(quantile(r.visible, 0.99) < 10, `p99 ${quantile(r.visible, 0.99)} ms`);
    return `visible p50 ${fmt(quantile(r.visible, 0.5))} p99 ${fmt(quantile(r.visible, 0.99))}; stored p50 ${fmt(quantile(r.stored, 0.5))} p99 ${fmt(quantile(r.stored, 0.99))}`;
  });

  await check(`the upload of ${UPLOAD_EDITS} edits queued offline completes`, async () => {
    const { ms, txs } = await page.evaluate(([url, n]) => window.bench.upload(url, "up", n, n), [serverUrl, UPLOAD_EDITS]);
    if (process.env.IDB_PROFILE) console.log(`upload transactions: ${txs.join(" ")}`);
    const { changes } = await node.changes({ database: "up", since: 0n, limit: 10000 });
    assert.equal(changes.length, Math.min(UPLOAD_EDITS, 10000));
    const rate = UPLOAD_EDITS / (ms / 1000);
    rows.push(`| upload of ${UPLOAD_EDITS.toLocaleString("en")} offline edits, IndexedDB | new docs, gRPC-Web | ${Math.round(rate).toLocaleString("en")} edits/s | ${(ms / 1000).toFixed(2)} s total |`);
    return `${Math.round(rate)} edits/s`;
  });

  await check(`the initial load of ${LOAD_DOCS} documents of 1 KB into an empty IndexedDB replica`, async () => {
    const cdp = process.env.IDB_PROFILE ? await page.context().newCDPSession(page) : undefined;
    if (cdp) {
      await cdp.send("Profiler.enable");
      await cdp.send("Profiler.start");
    }
    const { ms, reopenMs, txMs } = await page.evaluate(([url, n]) => window.bench.initialLoad(url, "load", n), [serverUrl, LOAD_DOCS]);
    if (process.env.IDB_PROFILE) console.log(`transactions (ms): ${txMs.join(" ")}`);
    if (cdp) writeFileSync(process.env.IDB_PROFILE, JSON.stringify((await cdp.send("Profiler.stop")).profile));
    const rate = LOAD_DOCS / (ms / 1000);
    rows.push(`| initial load into an empty IndexedDB replica | ${LOAD_DOCS.toLocaleString("en")} docs of 1 KB, Changes pages of 4000 | ${Math.round(rate).toLocaleString("en")} docs/s | ${(ms / 1000).toFixed(2)} s total |`);
    rows.push(`| reopen (read the replica back from IndexedDB) | ${LOAD_DOCS.toLocaleString("en")} docs of 1 KB | ${Math.round(LOAD_DOCS / (reopenMs / 1000)).toLocaleString("en")} docs/s | ${(reopenMs / 1000).toFixed(2)} s total |`);
    return `${Math.round(rate)} docs/s; reopened in ${Math.round(reopenMs)} ms`;
  });

  await check("no uncaught errors in the page", async () => assert.deepEqual(errors, []));

  console.log(`\nChromium ${chromeVersion}, IndexedDB:\n`);
  console.log("| what | workload | median / rate | p99 / total |");
  console.log("|---|---|---|---|");
  for (const row of rows) console.log(row);
}

const overall = setTimeout(() => {
  console.log(`FAIL: took longer than ${TIMEOUT_MS} ms`);
  failed += 1;
  void finish();
}, TIMEOUT_MS);

let finished = false;
async function finish() {
  if (finished) return;
  finished = true;
  clearTimeout(overall);
  await browser?.close().catch(() => undefined);
  pageServer?.close();
  server?.kill("SIGTERM");
  rmSync(dir, { recursive: true, force: true });
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}

main()
  .catch((err) => {
    failed += 1;
    console.log(`FAIL: ${err?.stack ?? err}`);
  })
  .finally(finish);
