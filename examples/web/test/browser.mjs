// The design note's session in a real browser, against the real server.
//
// Starts agsync ($AGSYNC_BIN, required) on a free 127.0.0.1 port with
// --cors-allow-origin for the demo page's origin, serves the built page
// (dist/, `npm run build` first), drives it in headless Chromium
// (/usr/bin/chromium, Debian's; $CHROMIUM_BIN to override) and checks:
//   1. create a database, get an id, create a document, update it;
//   2. a stale update shows the conflict with both versions, the server's
//      current one from the error details; merge and retry succeeds;
//   3. a second client outside the browser (Node, native gRPC over HTTP/2)
//      writes, and the page shows it within 2 s;
//   4. a reload resumes from the saved seq and loads only what changed while
//      it was away (exactly one document), not everything;
//   5. a page of an origin not in the allow list cannot use the server;
//   6. closing the tab frees its subscription promptly (the server runs with
//      --max-subscribers 1, so a new subscriber is refused until it does).
// Saves a screenshot of the conflict view to docs/web-demo.png (repo root;
// $SCREENSHOT_PATH to put it elsewhere).
// Prints one line per check and "N passed, N failed"; exits non-zero on any
// failure. Everything it starts is stopped by PID, temp dirs are removed,
// and the whole run is bounded by a 120 s timeout.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { chromium } from "playwright-core";
import { Code, ConnectError, SyncService, createClient } from "@agsync/web";

const here = dirname(fileURLToPath(import.meta.url));
const demoDir = join(here, "..");
const repoRoot = join(demoDir, "..", "..");
const screenshotPath = process.env.SCREENSHOT_PATH ?? join(repoRoot, "docs", "web-demo.png");
const OVERALL_TIMEOUT_MS = 120_000;
const LIVE_BUDGET_MS = 2_000;

// ---- preconditions: fail fast with what to do -------------------------------

function precondition(ok, message) {
  if (!ok) {
    console.error(`browser test: ${message}`);
    console.log("0 passed, 1 failed");
    process.exit(2);
  }
}
const agsyncBin = process.env.AGSYNC_BIN;
precondition(agsyncBin, "set AGSYNC_BIN to the agsync binary, e.g. AGSYNC_BIN=$PWD/../../target/release/agsync (cargo build --release first)");
precondition(existsSync(agsyncBin), `AGSYNC_BIN=${agsyncBin} does not exist`);
const chromiumBin = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";
precondition(existsSync(chromiumBin), `${chromiumBin} not found: install Debian's chromium (apt-get install -y chromium) or set CHROMIUM_BIN`);
precondition(existsSync(join(demoDir, "dist", "index.html")), "dist/ is missing: run `npm run build` first");

// ---- processes and cleanup ----------------------------------------------------

const children = [];
const tempDirs = [];
let context;

function tempDir(prefix) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  tempDirs.push(dir);
  return dir;
}

/** Starts a process and resolves with it and the first match of `pattern` in its output (ANSI colours stripped). */
function start(name, command, args, options, pattern, timeoutMs = 15_000) {
  const child = spawn(command, args, { ...options, stdio: ["ignore", "pipe", "pipe"] });
  children.push(child);
  let output = "";
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${name} did not start within ${timeoutMs} ms; output:\n${output}`)), timeoutMs);
    const onData = (chunk) => {
      output += chunk.toString().replace(/\x1b\[[0-9;]*m/g, "");
      const match = output.match(pattern);
      if (match) {
        clearTimeout(timer);
        resolve({ child, match, output: () => output });
      }
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", onData);
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`${name} exited (${code}) before it was ready; output:\n${output}`));
    });
  });
}

let cleanedUp = false;
async function cleanup() {
  if (cleanedUp) return;
  cleanedUp = true;
  try {
    await context?.close();
  } catch {
    // the browser is gone already
  }
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) {
      try {
        process.kill(child.pid, "SIGTERM");
      } catch {
        // already exited
      }
    }
  }
  await Promise.all(
    children.map(
      (child) =>
        new Promise((resolve) => {
          if (child.exitCode !== null || child.signalCode !== null) return resolve();
          const kill = setTimeout(() => {
            try {
              process.kill(child.pid, "SIGKILL");
            } catch {
              // already exited
            }
          }, 3000);
          child.on("exit", () => {
            clearTimeout(kill);
            resolve();
          });
        }),
    ),
  );
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
}

// ---- checks -------------------------------------------------------------------

let passed = 0;
let failed = 0;
/** Set once the page is open: its activity log, newest first, to print with a failure. */
let pageLog = async () => [];

async function check(what, fn) {
  const t0 = Date.now();
  try {
    const detail = await fn();
    passed += 1;
    console.log(`ok: ${what}${detail ? ` (${detail})` : ""} [${Date.now() - t0} ms]`);
  } catch (err) {
    failed += 1;
    console.log(`FAIL: ${what}\n  ${String(err?.stack ?? err).split("\n").join("\n  ")}`);
    const entries = await pageLog().catch(() => []);
    if (entries.length) console.log(`  the page's activity log, newest first:\n    ${entries.slice(0, 15).join("\n    ")}`);
    throw new Abort();
  }
}
class Abort extends Error {}

const overall = setTimeout(async () => {
  console.log(`FAIL: the whole run took longer than ${OVERALL_TIMEOUT_MS / 1000} s`);
  failed += 1;
  await finish();
}, OVERALL_TIMEOUT_MS);

async function finish() {
  clearTimeout(overall);
  await cleanup();
  console.log(failed === 0 ? "PASS: browser test" : "FAIL: browser test");
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => {
    failed += 1;
    console.log(`FAIL: interrupted by ${signal}`);
    void finish();
  });
}

// ---- the session ----------------------------------------------------------------

const json = (text) => JSON.parse(text);

async function main() {
  // The page's server first: agsync needs its origin.
  const page = await start("static server", process.execPath, [join(demoDir, "serve.mjs"), "--port", "0"], {}, /serving (http:\/\/127\.0\.0\.1:(\d+))\//);
  const pagePort = page.match[2];
  const pageOrigin = `http://127.0.0.1:${pagePort}`;
  const otherOrigin = `http://localhost:${pagePort}`; // the same page, an origin not allowed

  const serverDir = tempDir("agsync-browser-");
  const server = await start(
    "agsync",
    agsyncBin,
    ["--listen", "127.0.0.1:0", "--db", join(serverDir, "agsync.db"), "--cors-allow-origin", pageOrigin, "--max-subscribers", "1"],
    { cwd: serverDir, env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "agsync=info" } },
    /listening address=(127\.0\.0\.1:\d+)/,
  );
  const serverUrl = `http://${server.match[1]}`;
  console.log(`agsync at ${serverUrl} (allowing ${pageOrigin}), page at ${pageOrigin}/`);

  // The second client: Node, native gRPC over HTTP/2, the same generated code.
  const node = createClient(SyncService, createGrpcTransport({ baseUrl: serverUrl }));

  const userDataDir = tempDir("agsync-chromium-");
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: chromiumBin,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    viewport: { width: 1360, height: 780 },
  });
  const tab = context.pages()[0] ?? (await context.newPage());
  const browserErrors = [];
  tab.on("pageerror", (err) => browserErrors.push(String(err)));
  pageLog = () => tab.locator('[data-testid="log-entry"]').allTextContents();
  const testid = (id) => tab.locator(`[data-testid="${id}"]`);
  const row = (id) => tab.locator(`[data-testid="doc-row"][data-id="${id}"]`);
  const stats = () => tab.evaluate(() => window.agsyncDemo.stats);
  const database = "cars";
  const syncKey = "org.example.sync.Cars";
  let id;
  let rev1;
  let rev2;
  const merged = { model: "Mustang", year: 1970, color: "red" };

  await check("the page connects over gRPC-Web and lists databases", async () => {
    await tab.goto(`${pageOrigin}/`);
    await testid("server-url").fill(serverUrl);
    await testid("connect").click();
    await tab.locator('[data-testid="log-entry"]', { hasText: `connected to ${serverUrl}` }).waitFor({ timeout: 10_000 });
    assert.equal(await testid("status").getAttribute("data-state"), "idle");
  });

  await check("create a database with a sync key; the page subscribes and goes live", async () => {
    await testid("new-db-name").fill(database);
    await testid("new-db-key").fill(syncKey);
    await testid("create-db").click();
    await tab.locator('[data-testid="status"][data-state="live"]').waitFor({ timeout: 10_000 });
    const { databases } = await node.listDatabases({});
    assert.deepEqual(databases.map((d) => [d.name, d.syncKey]), [[database, syncKey]]);
  });

  const others = ["fiat-500", "vw-beetle"];
  await check("documents others write (Node, BulkPut) appear in the page", async () => {
    const { results } = await node.bulkPut({
      database,
      docs: [
        { id: others[0], body: { model: "Fiat 500", year: 1957, color: "cream" } },
        { id: others[1], body: { model: "Beetle", year: 1938 } },
      ],
    });
    assert.deepEqual(results.map((r) => r.error), ["", ""]);
    for (const other of others) await row(other).waitFor({ timeout: 5000 });
  });

  await check("new id, create the document, update it", async () => {
    await testid("new-doc").click();
    await tab.waitForFunction(() => /^[0-9a-f]{32}$/.test(document.querySelector('[data-testid="editor-id"]')?.textContent ?? ""));
    id = await testid("editor-id").textContent();
    await testid("editor-body").fill(JSON.stringify({ model: "Mustang", year: 1969 }));
    await testid("save").click();
    await tab.locator('[data-testid="editor-message"]', { hasText: "saved rev 1-" }).waitFor({ timeout: 5000 });
    await row(id).waitFor({ timeout: 5000 });
    rev1 = await row(id).getAttribute("data-rev");
    assert.match(rev1, /^1-[0-9a-f]{32}$/);
    await testid("editor-body").fill(JSON.stringify({ model: "Mustang", year: 1969, color: "red" }));
    await testid("save").click();
    await tab.locator('[data-testid="editor-message"]', { hasText: "saved rev 2-" }).waitFor({ timeout: 5000 });
    await tab.locator(`[data-testid="doc-row"][data-id="${id}"][data-rev^="2-"]`).waitFor({ timeout: 5000 });
    rev2 = await row(id).getAttribute("data-rev");
    return `${id} at ${rev2}`;
  });

  await check("a stale update (based on rev 1) shows both versions, the server's current from the error details", async () => {
    await testid("editor-history").selectOption(rev1);
    assert.deepEqual(json(await testid("editor-body").inputValue()), { model: "Mustang", year: 1969 });
    await testid("editor-body").fill(JSON.stringify({ model: "Mustang", year: 1970 }));
    await testid("save").click();
    await testid("conflict").waitFor({ state: "visible", timeout: 5000 });
    assert.deepEqual(json(await testid("conflict-mine").textContent()), { model: "Mustang", year: 1970 });
    assert.deepEqual(json(await testid("conflict-theirs").textContent()), { model: "Mustang", year: 1969, color: "red" });
    assert.equal(await testid("conflict-theirs-rev").textContent(), rev2);
    mkdirSync(dirname(screenshotPath), { recursive: true });
    await tab.screenshot({ path: screenshotPath });
    return `screenshot ${screenshotPath}`;
  });

  await check("merge (theirs + the field you changed) and retry with the current rev succeeds", async () => {
    await testid("conflict-merge").click();
    assert.deepEqual(json(await testid("conflict-merged").inputValue()), merged);
    await testid("conflict-confirm").click();
    await tab.locator('[data-testid="editor-message"]', { hasText: "saved rev 3-" }).waitFor({ timeout: 5000 });
    assert.equal(await testid("conflict").isVisible(), false);
    const { document } = await node.get({ database, id });
    assert.match(document.rev, /^3-/);
    assert.deepEqual(document.body, merged);
    await tab.locator(`[data-testid="doc-row"][data-id="${id}"][data-rev="${document.rev}"]`).waitFor({ timeout: 5000 });
    assert.deepEqual(json(await row(id).locator('[data-testid="doc-body"]').textContent()), merged);
  });

  let liveMs;
  await check(`a write by a Node client (gRPC over HTTP/2) shows up in the page within ${LIVE_BUDGET_MS} ms`, async () => {
    const other = "from-node";
    const t0 = performance.now();
    await node.put({ database, id: other, body: { model: "Beetle", year: 1963, by: "node" } });
    await row(other).waitFor({ timeout: 10_000 });
    liveMs = Math.round(performance.now() - t0);
    assert.ok(liveMs < LIVE_BUDGET_MS, `it took ${liveMs} ms`);
    assert.deepEqual(json(await row(other).locator('[data-testid="doc-body"]').textContent()), { model: "Beetle", year: 1963, by: "node" });
    return `${liveMs} ms from Put to the row on screen`;
  });

  await check("a reload resumes from the saved seq and loads only what changed while away", async () => {
    const before = await tab.evaluate(({ serverUrl, database }) => JSON.parse(localStorage.getItem(`agsync-demo.sync:${serverUrl}:${database}`)), {
      serverUrl,
      database,
    });
    assert.ok(before?.seq, "a seq is saved");
    const loadedBefore = (await stats()).docsLoaded;
    assert.ok(loadedBefore >= 2, `the first visit loaded documents (${loadedBefore})`);
    // Leave the page (its stream closes), write while it is away, come back.
    await tab.goto("about:blank");
    const away = await node.put({ database, id: "while-away", body: { model: "Mini", year: 1959 } });
    await tab.goto(`${pageOrigin}/`);
    await row("while-away").waitFor({ timeout: 10_000 });
    await tab.locator('[data-testid="status"][data-state="live"]').waitFor({ timeout: 10_000 });
    const after = await stats();
    assert.deepEqual(after.subscribeSince[0], before.seq, "the first Subscribe after the reload sends the saved seq as since");
    assert.deepEqual(
      after.changes.map((c) => [c.since, c.reset, c.ids]),
      [[before.databases[database], false, ["while-away"]]],
      "one Changes batch, from the saved position, with only the document written while away",
    );
    assert.equal(after.docsLoaded, 1);
    assert.equal(await testid("docs-loaded").textContent(), "1");
    // The rest comes from the page's own copy: all three documents are shown.
    assert.deepEqual((await tab.locator('[data-testid="doc-row"]').evaluateAll((rows) => rows.map((r) => r.dataset.id))).sort(), [id, ...others, "from-node", "while-away"].sort());
    const savedNow = await tab.evaluate(() => window.agsyncDemo.storedSeq());
    assert.equal(savedNow, away.seq.toString(), "the saved position moved to the write made while away");
    return `resumed with since=${before.seq}, loaded 1 document from since=${before.databases[database]}`;
  });

  await check("a page of an origin not in --cors-allow-origin cannot call the server", async () => {
    const stranger = await context.newPage();
    try {
      await stranger.goto(`${otherOrigin}/`);
      // A raw gRPC-Web call (an empty ListDatabasesRequest) as any script on that page could make.
      const outcome = await stranger.evaluate(async (url) => {
        try {
          const res = await fetch(`${url}/agsync.v1.SyncService/ListDatabases`, {
            method: "POST",
            headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
            body: new Uint8Array([0, 0, 0, 0, 0]),
          });
          return `answered ${res.status}`;
        } catch (err) {
          return `refused: ${err}`;
        }
      }, serverUrl);
      assert.match(outcome, /^refused: TypeError/);
      // And the demo itself says so.
      await stranger.locator('[data-testid="server-url"]').fill(serverUrl);
      await stranger.locator('[data-testid="connect"]').click();
      await stranger.locator('[data-testid="status"][data-state="error"]').waitFor({ timeout: 10_000 });
      // The same call from the allowed origin works (so the refusal is CORS, not the call).
      const allowed = await tab.evaluate(async (url) => {
        const res = await fetch(`${url}/agsync.v1.SyncService/ListDatabases`, {
          method: "POST",
          headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
          body: new Uint8Array([0, 0, 0, 0, 0]),
        });
        return res.status;
      }, serverUrl);
      assert.equal(allowed, 200);
      return `${otherOrigin}: ${outcome}`;
    } finally {
      await stranger.close();
    }
  });

  await check("closing the tab frees its subscription promptly (--max-subscribers 1)", async () => {
    // While the tab is open, the server's only subscription slot is taken.
    const probe = async () => {
      const abort = new AbortController();
      try {
        for await (const res of node.subscribe({ syncKeys: [syncKey] }, { signal: abort.signal })) {
          if (res.event.case === "subscribed") return "subscribed";
        }
        return "ended";
      } catch (err) {
        return ConnectError.from(err).code === Code.ResourceExhausted ? "refused" : `error ${ConnectError.from(err).message}`;
      } finally {
        abort.abort();
      }
    };
    assert.equal(await probe(), "refused", "the open tab holds the only subscription");
    const t0 = performance.now();
    await tab.close();
    for (;;) {
      const outcome = await probe();
      if (outcome === "subscribed") break;
      assert.equal(outcome, "refused");
      assert.ok(performance.now() - t0 < 5000, "the subscription is still held 5 s after the tab closed");
      await new Promise((r) => setTimeout(r, 50));
    }
    return `freed ${Math.round(performance.now() - t0)} ms after the tab closed`;
  });

  await check("no uncaught errors in the page", async () => {
    assert.deepEqual(browserErrors, []);
  });
}

main()
  .catch((err) => {
    if (!(err instanceof Abort)) {
      failed += 1;
      console.log(`FAIL: ${err?.stack ?? err}`);
    }
  })
  .finally(finish);
