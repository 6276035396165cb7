// The offline-first demo in a real browser, against the real server.
//
// Starts agsync ($AGSYNC_BIN, required) on a free 127.0.0.1 port with
// --cors-allow-origin for the page's origin and a metrics listener, serves
// the built page (dist/, `npm run build` first), and drives it in headless
// Chromium (/usr/bin/chromium, Debian's; $CHROMIUM_BIN to override) through
// playwright-core:
//   1. two browser contexts (two users' devices), A with two tabs, B with
//      one, load the todo list; one tab per device syncs (one Subscribe
//      stream per device: agsync_subscribers is 2);
//   2. both go offline (context.setOffline); the same and different todos
//      are edited in each, in both of A's tabs (one outbox per device);
//   3. A's syncing tab is reloaded while offline: the page comes from the
//      service worker, the pending edits from IndexedDB, and the other tab
//      takes over within 2 s;
//   4. A comes back online and syncs, then B: B's edit of a todo A also
//      changed is merged field by field (disjoint fields combine, the
//      server wins the overlap);
//   5. every tab converges to the server's state (checked with Changes);
//      a write by a Node client then shows in every tab within 2 s.
// Saves screenshots of the offline view (pending edits) and the converged
// view: $SCREENSHOT_PATH (default docs/offline-first.png here) and the same
// name with -synced.
// Prints one line per check and "N passed, N failed"; exits non-zero on any
// failure. Everything it starts is stopped by PID, temp dirs are removed,
// and the whole run is bounded by a timeout.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { chromium } from "playwright-core";
import { SyncService, createClient } from "@agsync/web";

const here = dirname(fileURLToPath(import.meta.url));
const demoDir = join(here, "..");
const screenshotPath = process.env.SCREENSHOT_PATH ?? join(demoDir, "docs", "offline-first.png");
const syncedScreenshotPath = screenshotPath.replace(/(\.png)?$/, "-synced.png");
const OVERALL_TIMEOUT_MS = 240_000;
const TAKEOVER_BUDGET_MS = 2_000;
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
let browser;

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
    await browser?.close();
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

async function step(what, fn) {
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

function freePort() {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

async function main() {
  const page = await start("static server", process.execPath, [join(demoDir, "serve.mjs"), "--port", "0"], {}, /serving (http:\/\/127\.0\.0\.1:(\d+))\//);
  const pageOrigin = `http://127.0.0.1:${page.match[2]}`;
  const metricsPort = await freePort();
  const serverDir = tempDir("agsync-browser-");
  const server = await start(
    "agsync",
    agsyncBin,
    ["--listen", "127.0.0.1:0", "--db", join(serverDir, "agsync.db"), "--cors-allow-origin", pageOrigin, "--metrics-listen", `127.0.0.1:${metricsPort}`],
    { cwd: serverDir, env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "agsync=info" } },
    /listening address=(127\.0\.0\.1:\d+)/,
  );
  const serverUrl = `http://${server.match[1]}`;
  console.log(`agsync at ${serverUrl} (allowing ${pageOrigin}), page at ${pageOrigin}/`);
  const subscribers = async () => {
    const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    return Number(text.match(/^agsync_subscribers(?:\{[^}]*\})? (\d+)/m)?.[1] ?? NaN);
  };

  // The seed: four todos, written by a Node client (native gRPC over HTTP/2).
  const node = createClient(SyncService, createGrpcTransport({ baseUrl: serverUrl }));
  const database = "todos";
  await node.createDatabase({ name: database });
  const seed = [
    ["t1", "Buy milk"],
    ["t2", "Call the plumber"],
    ["t3", "Water the plants"],
    ["t4", "Book flights"],
  ];
  await node.bulkPut({ database, docs: seed.map(([id, title], i) => ({ id, body: { title, done: false, created: i + 1 } })) });

  browser = await chromium.launch({ executablePath: chromiumBin, headless: true, args: CHROMIUM_ARGS });
  const errors = [];
  const url = `${pageOrigin}/?server=${encodeURIComponent(serverUrl)}&db=${database}`;
  async function openTab(context, name) {
    const tab = await context.newPage();
    tab.on("pageerror", (err) => errors.push(`${name}: ${err}`));
    await tab.setViewportSize({ width: 1180, height: 640 });
    await tab.goto(url);
    await tab.locator('body[data-ready="true"]').waitFor({ timeout: 15_000 });
    return tab;
  }
  const deviceA = await browser.newContext();
  const deviceB = await browser.newContext();
  const a1 = await openTab(deviceA, "A1");
  const a2 = await openTab(deviceA, "A2");
  const b1 = await openTab(deviceB, "B1");
  const tabs = { A1: a1, A2: a2, B1: b1 };
  pageLog = () => b1.locator('[data-testid="log-entry"]').allTextContents();

  const todo = (tab, id) => tab.locator(`[data-testid="todo"][data-id="${id}"]`);
  const todos = (tab) => tab.evaluate(() => window.agsyncDemo.todos());
  const status = (tab) => tab.evaluate(() => window.agsyncDemo.status());
  const synced = (tab) => tab.evaluate(() => window.agsyncDemo.whenSynced(60_000));
  const leaderOf = async (...list) => {
    const roles = await Promise.all(list.map((tab) => tab.evaluate(() => window.agsyncDemo.status().leader)));
    return roles;
  };
  async function editTitle(tab, id, title) {
    const input = todo(tab, id).locator('[data-testid="todo-title"]');
    await input.fill(title);
    await input.press("Enter");
    await tab.locator(`[data-testid="todo"][data-id="${id}"][data-title="${title}"]`).waitFor({ timeout: 5000 });
  }
  async function check(tab, id) {
    await todo(tab, id).locator('[data-testid="todo-done"]').check();
    await tab.locator(`[data-testid="todo"][data-id="${id}"][data-done="true"]`).waitFor({ timeout: 5000 });
  }

  await step("three tabs on two devices load the list; one tab per device syncs (one stream each)", async () => {
    for (const [name, tab] of Object.entries(tabs)) {
      await tab.locator('[data-testid="connection"][data-state="online"]').waitFor({ timeout: 15_000 });
      await tab.waitForFunction(() => window.agsyncDemo.todos().length === 4, null, { timeout: 10_000 });
      // The service worker has the page (for the offline reload later) once it controls the tab.
      await tab.evaluate(() => navigator.serviceWorker.ready.then(() => true));
      await tab.waitForFunction(() => navigator.serviceWorker.controller !== null, null, { timeout: 20_000 });
      assert.deepEqual((await todos(tab)).map((t) => t.title), seed.map(([, title]) => title), name);
    }
    const roles = await leaderOf(a1, a2, b1);
    assert.equal(roles.filter(Boolean).length, 2, `one leader per device: ${roles}`);
    assert.notEqual(roles[0], roles[1], "exactly one of A's tabs syncs");
    await waitUntil(async () => (await subscribers()) === 2, "the server to count 2 Subscribe streams");
    return `${roles[0] ? "A1" : "A2"} and B1 sync, ${roles[0] ? "A2" : "A1"} follows; agsync_subscribers = 2`;
  });

  await step("both devices go offline; edits of the same and of different todos, in both of A's tabs", async () => {
    await deviceA.setOffline(true);
    await deviceB.setOffline(true);
    await editTitle(a1, "t1", "Buy oat milk"); // A: title of t1
    await check(a2, "t2"); // A, the other tab: t2 done
    await editTitle(a2, "t3", "Water the plants (A)"); // A and B: t3's title, an overlap
    await a1.locator('[data-testid="new-title"]').fill("Fix the bike");
    await a1.locator('[data-testid="add"]').click();
    await a1.locator('[data-testid="todo"][data-title="Fix the bike"]').waitFor({ timeout: 5000 });
    await check(b1, "t1"); // B: done of t1, a field A did not touch
    await editTitle(b1, "t3", "Water the plants (B)");
    await todo(b1, "t4").locator('[data-testid="todo-delete"]').click();
    await todo(b1, "t4").waitFor({ state: "detached", timeout: 5000 });
    // Every tab of A shows all of A's edits, pending; nothing reached the server.
    for (const tab of [a1, a2]) {
      await tab.waitForFunction(() => window.agsyncDemo.status().pending === 4, null, { timeout: 5000 });
      await tab.locator('[data-testid="todo"][data-id="t1"][data-title="Buy oat milk"][data-pending="true"]').waitFor({ timeout: 5000 });
      await tab.locator('[data-testid="todo"][data-id="t2"][data-done="true"][data-pending="true"]').waitFor({ timeout: 5000 });
    }
    assert.equal((await status(b1)).pending, 3);
    for (const tab of [a1, b1]) await tab.locator('[data-testid="connection"][data-state="offline"]').waitFor({ timeout: 15_000 });
    const { changes } = await node.changes({ database, since: 0n });
    assert.deepEqual(changes.map((c) => c.rev.split("-")[0]), ["1", "1", "1", "1"], "the server has only the seed");
    return "A: 4 pending edits (2 tabs), B: 3";
  });

  await step(`a reload of A's syncing tab while offline keeps the pending edits; the other tab takes over within ${TAKEOVER_BUDGET_MS} ms`, async () => {
    const [leading, following] = (await leaderOf(a1))[0] ? [a1, a2] : [a2, a1];
    const t0 = Date.now();
    await leading.reload();
    await following.waitForFunction(() => window.agsyncDemo.status().leader, null, { timeout: TAKEOVER_BUDGET_MS * 2 });
    const takeoverMs = Date.now() - t0;
    await leading.locator('body[data-ready="true"]').waitFor({ timeout: 15_000 });
    assert.equal((await status(leading)).pending, 4);
    assert.equal((await status(leading)).leader, false);
    await leading.locator('[data-testid="todo"][data-id="t1"][data-title="Buy oat milk"][data-pending="true"]').waitFor({ timeout: 5000 });
    await leading.locator('[data-testid="todo"][data-title="Fix the bike"][data-pending="true"]').waitFor({ timeout: 5000 });
    assert.ok(takeoverMs < TAKEOVER_BUDGET_MS, `the other tab took ${takeoverMs} ms to take over`);
    mkdirSync(dirname(screenshotPath), { recursive: true });
    await leading.screenshot({ path: screenshotPath });
    return `the other tab led ${takeoverMs} ms after the reload began; screenshot ${screenshotPath}`;
  });

  await step("back online, A then B: everything uploads once, B's edits merge with A's", async () => {
    await deviceA.setOffline(false);
    await synced(a1);
    await synced(a2);
    await deviceB.setOffline(false);
    await synced(b1);
    for (const tab of [a1, a2]) await synced(tab);
    const merges = await b1.evaluate(() => window.agsyncDemo.outcomes.filter((o) => o.kind === "merged").map((o) => o.id).sort());
    assert.deepEqual(merges, ["t1", "t3"], "B's edits of t1 and t3 met A's: merged");
  });

  await step("every tab converges to the server's state, with the merge applied", async () => {
    const { changes } = await node.changes({ database, since: 0n, includeDocs: true });
    const server = changes
      .filter((c) => !c.deleted)
      .map((c) => ({ id: c.id, rev: c.rev, title: c.body.title, done: c.body.done }))
      .sort((x, y) => (x.id < y.id ? -1 : 1));
    const byId = Object.fromEntries(server.map((d) => [d.id, d]));
    assert.deepEqual([byId.t1?.title, byId.t1?.done], ["Buy oat milk", true], "t1: A's title and B's done, combined");
    assert.equal(byId.t2?.done, true);
    assert.equal(byId.t3?.title, "Water the plants (A)", "t3: both changed the title; the server's (A's, first) wins");
    assert.equal(byId.t4, undefined, "t4 deleted by B");
    assert.ok(server.some((d) => d.title === "Fix the bike"));
    for (const [name, tab] of Object.entries(tabs)) {
      const mine = (await todos(tab)).map((t) => ({ id: t.id, rev: t.rev, title: t.title, done: t.done, pending: t.pending })).sort((x, y) => (x.id < y.id ? -1 : 1));
      assert.deepEqual(mine, server.map((d) => ({ ...d, pending: false })), `${name} differs from the server`);
      await tab.locator('[data-testid="connection"][data-state="online"]').waitFor({ timeout: 10_000 });
    }
    await b1.screenshot({ path: syncedScreenshotPath });
    return `${server.length} todos everywhere; screenshot ${syncedScreenshotPath}`;
  });

  await step(`a write by a Node client shows in every tab within ${LIVE_BUDGET_MS} ms; still one stream per device`, async () => {
    const t0 = performance.now();
    await node.put({ database, id: "t9", body: { title: "From Node", done: false, created: 9 } });
    await Promise.all(Object.values(tabs).map((tab) => tab.locator('[data-testid="todo"][data-id="t9"]').waitFor({ timeout: 10_000 })));
    const ms = Math.round(performance.now() - t0);
    assert.ok(ms < LIVE_BUDGET_MS, `it took ${ms} ms`);
    await waitUntil(async () => (await subscribers()) === 2, "the server to count 2 Subscribe streams");
    return `${ms} ms from Put to all three tabs`;
  });

  await step("no uncaught errors in the pages", async () => {
    assert.deepEqual(errors, []);
  });
}

/** Polls an async condition every 100 ms for up to 10 s. */
async function waitUntil(cond, what, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

main()
  .catch((err) => {
    if (!(err instanceof Abort)) {
      failed += 1;
      console.log(`FAIL: ${err?.stack ?? err}`);
    }
  })
  .finally(finish);
