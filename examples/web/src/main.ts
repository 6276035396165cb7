// The agsync web demo: connect over gRPC-Web, open (or create) a database,
// watch its documents change live through a SyncClient, edit one, and
// resolve conflicts with the server's current version side by side.
//
// The page keeps its copy of the open database (the "replica") and the
// SyncClient's position in localStorage, so a reload shows the documents at
// once and loads only what changed while it was away. Everything a test
// needs to observe is in the DOM (ids, data-testid) and in
// `window.agsyncDemo.stats`.
import {
  Code,
  ConnectError,
  LocalStorageStateStore,
  SyncClient,
  SyncService,
  conflictOf,
  createAgsyncTransport,
  createClient,
  overlayChanges,
  type ChangesBatch,
  type Client,
  type Conflict,
  type Database,
  type Document,
  type JsonObject,
  type SyncStatus,
} from "@agsync/web";

// ---- DOM ----------------------------------------------------------------

function el<T extends HTMLElement = HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`missing element #${id}`);
  return found as T;
}

const ui = {
  status: el("status"),
  seq: el("seq"),
  docsLoaded: el("docs-loaded"),
  serverUrl: el<HTMLInputElement>("server-url"),
  token: el<HTMLInputElement>("token"),
  connect: el<HTMLButtonElement>("connect"),
  dbSelect: el<HTMLSelectElement>("db-select"),
  refreshDbs: el<HTMLButtonElement>("refresh-dbs"),
  newDbName: el<HTMLInputElement>("new-db-name"),
  newDbKey: el<HTMLInputElement>("new-db-key"),
  createDb: el<HTMLButtonElement>("create-db"),
  dbInfo: el("db-info"),
  docCount: el("doc-count"),
  newDoc: el<HTMLButtonElement>("new-doc"),
  docList: el("doc-list"),
  editor: el("editor"),
  editorId: el("editor-id"),
  editorHistory: el<HTMLSelectElement>("editor-history"),
  editorStale: el("editor-stale"),
  editorBody: el<HTMLTextAreaElement>("editor-body"),
  editorMessage: el("editor-message"),
  save: el<HTMLButtonElement>("save"),
  closeEditor: el<HTMLButtonElement>("close-editor"),
  log: el("log"),
  conflict: el("conflict"),
  conflictId: el("conflict-id"),
  conflictBaseRev: el("conflict-base-rev"),
  conflictMine: el("conflict-mine"),
  conflictTheirs: el("conflict-theirs"),
  conflictTheirsRev: el("conflict-theirs-rev"),
  conflictMergeBox: el("conflict-merge-box"),
  conflictMerged: el<HTMLTextAreaElement>("conflict-merged"),
  conflictMerge: el<HTMLButtonElement>("conflict-merge"),
  conflictConfirm: el<HTMLButtonElement>("conflict-confirm"),
  conflictOverwrite: el<HTMLButtonElement>("conflict-overwrite"),
  conflictDiscard: el<HTMLButtonElement>("conflict-discard"),
};

// ---- what a test can observe ---------------------------------------------

interface ChangesRecord {
  database: string;
  since: string;
  lastSeq: string;
  reset: boolean;
  ids: string[];
}

const stats = {
  /** The `since` of each Subscribe this page load sent (null: live only). */
  subscribeSince: [] as (string | null)[],
  /** Every batch of Changes loaded since the page loaded. */
  changes: [] as ChangesRecord[],
  /** Documents loaded through Changes since the page loaded. */
  docsLoaded: 0,
  /** When each document id was last seen arriving (performance.now()). */
  arrivedAt: {} as Record<string, number>,
};

declare global {
  interface Window {
    agsyncDemo: { stats: typeof stats; status: () => SyncStatus | undefined; storedSeq: () => string | null };
  }
}

window.agsyncDemo = {
  stats,
  status: () => sync?.status,
  storedSeq: () => {
    const seq = sync?.state?.seq;
    return seq === undefined ? null : seq.toString();
  },
};

// ---- activity log ---------------------------------------------------------

type Level = "info" | "ok" | "warn" | "error";

function log(message: string, level: Level = "info"): void {
  const li = document.createElement("li");
  li.className = level;
  li.dataset["testid"] = "log-entry";
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString([], { hour12: false });
  li.append(time, document.createTextNode(` ${message}`));
  ui.log.prepend(li);
  while (ui.log.childElementCount > 200) ui.log.lastElementChild?.remove();
}

function describeError(err: unknown): string {
  const e = ConnectError.from(err);
  return `${Code[e.code] ?? e.code}: ${e.rawMessage}`;
}

// ---- settings kept across reloads -----------------------------------------

const SERVER_KEY = "agsync-demo.server";
const DATABASE_KEY = "agsync-demo.database";
// The token only for this tab's session: localStorage would keep a secret on disk.
const TOKEN_KEY = "agsync-demo.token";

ui.serverUrl.value = localStorage.getItem(SERVER_KEY) ?? ui.serverUrl.value;
ui.token.value = sessionStorage.getItem(TOKEN_KEY) ?? "";

// ---- the replica: this page's copy of the open database ------------------

interface ReplicaDoc {
  rev: string;
  seq: bigint;
  body: JsonObject;
}

class Replica {
  readonly docs = new Map<string, ReplicaDoc>();
  /** The bodies of revisions this page has seen, per id (for "based on"). */
  readonly history = new Map<string, Map<string, JsonObject>>();

  constructor(readonly storageKey: string) {
    try {
      const saved = JSON.parse(localStorage.getItem(storageKey) ?? "{}") as Record<string, { rev: string; seq: string; body: JsonObject }>;
      for (const [id, doc] of Object.entries(saved)) this.#set(id, { rev: doc.rev, seq: BigInt(doc.seq), body: doc.body });
    } catch {
      localStorage.removeItem(storageKey);
    }
  }

  #set(id: string, doc: ReplicaDoc): void {
    this.docs.set(id, doc);
    this.remember(id, doc.rev, doc.body);
  }

  remember(id: string, rev: string, body: JsonObject): void {
    let revs = this.history.get(id);
    if (!revs) this.history.set(id, (revs = new Map()));
    revs.set(rev, body);
  }

  apply(batch: ChangesBatch): void {
    if (batch.reset) this.docs.clear();
    for (const change of batch.changes) {
      if (change.deleted) this.docs.delete(change.id);
      else this.#set(change.id, { rev: change.rev, seq: change.seq, body: change.body ?? {} });
    }
    this.save();
  }

  clear(): void {
    this.docs.clear();
    this.save();
  }

  save(): void {
    const out: Record<string, { rev: string; seq: string; body: JsonObject }> = {};
    for (const [id, doc] of this.docs) out[id] = { rev: doc.rev, seq: doc.seq.toString(), body: doc.body };
    localStorage.setItem(this.storageKey, JSON.stringify(out));
  }
}

// ---- connection -------------------------------------------------------------

let api: Client<typeof SyncService> | undefined;
let transport: ReturnType<typeof createAgsyncTransport> | undefined;
let serverUrl = "";
let databases: Database[] = [];
let sync: SyncClient | undefined;
let replica: Replica | undefined;
let openDb: Database | undefined;

function setStatus(state: string, text: string, title = ""): void {
  ui.status.dataset["state"] = state;
  ui.status.textContent = text;
  ui.status.title = title;
}

async function connect(): Promise<boolean> {
  serverUrl = ui.serverUrl.value.trim().replace(/\/+$/, "");
  localStorage.setItem(SERVER_KEY, serverUrl);
  sessionStorage.setItem(TOKEN_KEY, ui.token.value);
  await closeDatabase();
  transport = createAgsyncTransport({ baseUrl: serverUrl, token: () => ui.token.value.trim() });
  api = createClient(SyncService, transport);
  setStatus("connecting", "connecting…");
  try {
    await refreshDatabases();
  } catch (err) {
    setStatus("error", "cannot reach server", describeError(err));
    log(`cannot list databases at ${serverUrl}: ${describeError(err)}`, "error");
    if (/fetch/i.test(ConnectError.from(err).rawMessage)) {
      // The browser hides why (CORS): say the likely cause.
      log(`is the server running, and does it allow this page's origin? (agsync --cors-allow-origin ${location.origin})`, "warn");
    }
    return false;
  }
  setStatus("idle", "connected");
  log(`connected to ${serverUrl}: ${databases.length} database(s)`, "ok");
  ui.createDb.disabled = false;
  ui.refreshDbs.disabled = false;
  return true;
}

async function refreshDatabases(): Promise<void> {
  if (!api) return;
  databases = (await api.listDatabases({})).databases;
  ui.dbSelect.replaceChildren(new Option(databases.length ? "— choose —" : "— no databases yet —", ""));
  for (const db of databases) {
    const label = db.syncKey === db.name ? db.name : `${db.name}  (${db.syncKey})`;
    ui.dbSelect.append(new Option(label, db.name, false, db.name === openDb?.name));
  }
  ui.dbSelect.disabled = false;
}

async function createDatabase(): Promise<void> {
  if (!api) return;
  const name = ui.newDbName.value.trim();
  const syncKey = ui.newDbKey.value.trim();
  try {
    const { database } = await api.createDatabase({ name, syncKey });
    log(`created database ${database!.name} (sync key ${database!.syncKey})`, "ok");
    await refreshDatabases();
    await openDatabase(database!.name);
  } catch (err) {
    log(`cannot create database "${name}": ${describeError(err)}`, "error");
  }
}

// ---- syncing the open database -------------------------------------------

function stateKey(kind: "sync" | "replica", db: string): string {
  return `agsync-demo.${kind}:${serverUrl}:${db}`;
}

async function closeDatabase(): Promise<void> {
  const old = sync;
  sync = undefined;
  await old?.stop();
  openDb = undefined;
  replica = undefined;
  closeEditor();
  renderDocs();
}

async function openDatabase(name: string): Promise<void> {
  await closeDatabase();
  const db = databases.find((d) => d.name === name);
  if (!db || !transport) return;
  openDb = db;
  localStorage.setItem(DATABASE_KEY, name);
  ui.dbSelect.value = name;
  ui.dbInfo.textContent = `sync key ${db.syncKey}`;
  ui.newDoc.disabled = false;
  replica = new Replica(stateKey("replica", name));
  renderDocs();
  const store = new LocalStorageStateStore(stateKey("sync", name));
  const saved = store.get();
  if (saved?.seq !== undefined) log(`opened ${name}: ${replica.docs.size} document(s) kept locally, resuming after seq ${saved.seq}`);
  else log(`opened ${name}: first sync`);

  const client: SyncClient = new SyncClient({
    transport,
    syncKeys: [db.syncKey],
    databases: [name],
    store,
    onSubscribe: (since) => {
      stats.subscribeSince.push(since === undefined ? null : since.toString());
    },
    onChanges: (batch) => {
      if (client !== sync || !replica) return;
      replica.apply(batch);
      const now = performance.now();
      for (const change of batch.changes) stats.arrivedAt[change.id] = now;
      stats.changes.push({
        database: batch.database,
        since: batch.since.toString(),
        lastSeq: batch.lastSeq.toString(),
        reset: batch.reset,
        ids: batch.changes.map((c) => c.id),
      });
      stats.docsLoaded += batch.changes.length;
      ui.docsLoaded.textContent = String(stats.docsLoaded);
      const what = batch.changes.length === 1 ? batch.changes[0]!.id : `${batch.changes.length} documents`;
      log(`loaded ${what} via Changes since ${batch.since}${batch.reset ? " (from the start)" : ""}`);
      renderDocs(new Set(batch.changes.map((c) => c.id)));
      refreshEditorStaleness();
    },
    onDatabaseDeleted: (database) => {
      log(`database ${database} was deleted`, "warn");
      replica?.clear();
      renderDocs();
    },
    onResync: (info) => {
      log(`the server no longer has the events since our position (${info.reason}): reloading everything`, "warn");
      replica?.clear();
      renderDocs();
    },
    onStatus: (status) => {
      if (client === sync) renderStatus(status);
    },
    onError: (err) => {
      if (client === sync && err.code !== Code.Canceled) log(`stream ended: ${describeError(err)}`, "warn");
    },
  });
  sync = client;
  client.start();
}

let lastState = "";

function renderStatus(status: SyncStatus): void {
  const entered = status.state !== lastState;
  lastState = status.state;
  ui.seq.textContent = status.seq === undefined ? "–" : status.seq.toString();
  switch (status.state) {
    case "connecting":
      setStatus("connecting", status.attempt ? `connecting (attempt ${status.attempt + 1})…` : "connecting…");
      break;
    case "catching-up":
      setStatus("connecting", "catching up…");
      break;
    case "live":
      setStatus("live", "live");
      break;
    case "reconnecting":
      setStatus("reconnecting", `reconnecting in ${(status.delayMs / 1000).toFixed(1)} s`, describeError(status.error));
      break;
    case "stopped":
      setStatus(status.error ? "error" : "idle", "stopped", status.error ? describeError(status.error) : "");
      if (status.error && entered) log(`sync stopped: ${describeError(status.error)}`, "error");
      break;
  }
  if (status.state === "live" && entered) log(`live at seq ${status.seq ?? status.headSeq}`, "ok");
}

// ---- documents -------------------------------------------------------------

function shortRev(rev: string): string {
  const [gen, hash] = rev.split("-");
  return hash ? `${gen}-${hash.slice(0, 6)}` : rev;
}

function renderDocs(changed = new Set<string>()): void {
  const docs = [...(replica?.docs ?? new Map<string, ReplicaDoc>())].sort((a, b) => (a[1].seq < b[1].seq ? 1 : -1));
  ui.docCount.textContent = String(docs.length);
  if (!docs.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = document.createElement("td");
    td.colSpan = 4;
    td.textContent = openDb ? "No documents yet: add one, or write from another client." : "Open a database to see its documents, live.";
    tr.append(td);
    ui.docList.replaceChildren(tr);
    return;
  }
  ui.docList.replaceChildren(
    ...docs.map(([id, doc]) => {
      const tr = document.createElement("tr");
      tr.dataset["testid"] = "doc-row";
      tr.dataset["id"] = id;
      tr.dataset["rev"] = doc.rev;
      if (changed.has(id)) tr.classList.add("flash");
      if (id === editing?.id) tr.classList.add("selected");
      const cells = [id, shortRev(doc.rev), doc.seq.toString(), JSON.stringify(doc.body)];
      cells.forEach((text, i) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (i === 1) td.title = doc.rev;
        if (i === 3) td.dataset["testid"] = "doc-body";
        tr.append(td);
      });
      tr.addEventListener("click", () => openEditor(id));
      return tr;
    }),
  );
}

// ---- editor and conflicts --------------------------------------------------

interface Editing {
  id: string;
  /** The revision the edit is based on ("" for a new document). */
  rev: string;
  /** The body at that revision. */
  base: JsonObject;
}

let editing: Editing | undefined;

function pretty(body: JsonObject | undefined): string {
  return body === undefined ? "(deleted)" : JSON.stringify(body, null, 2);
}

function openEditor(id: string, rev?: string, body?: JsonObject): void {
  const current = replica?.docs.get(id);
  const atRev = rev ?? current?.rev ?? "";
  const base = body ?? replica?.history.get(id)?.get(atRev) ?? current?.body ?? {};
  editing = { id, rev: atRev, base };
  ui.editor.hidden = false;
  ui.editorId.textContent = id;
  ui.editorBody.value = pretty(base);
  ui.editorMessage.textContent = "";
  renderHistory();
  refreshEditorStaleness();
  renderDocs();
}

function renderHistory(): void {
  if (!editing) return;
  const revs = [...(replica?.history.get(editing.id)?.keys() ?? [])].sort(
    (a, b) => Number(b.split("-")[0]) - Number(a.split("-")[0]),
  );
  const current = replica?.docs.get(editing.id)?.rev;
  ui.editorHistory.replaceChildren(
    ...(editing.rev === "" ? [new Option("new document", "", true, true)] : []),
    ...revs.map((rev) => new Option(`rev ${shortRev(rev)}${rev === current ? " (current)" : ""}`, rev, false, rev === editing!.rev)),
  );
}

function refreshEditorStaleness(): void {
  if (!editing) return;
  const current = replica?.docs.get(editing.id);
  const stale = editing.rev !== "" && current !== undefined && current.rev !== editing.rev;
  ui.editorStale.hidden = !stale;
  ui.editorStale.textContent = stale
    ? `This document is at rev ${shortRev(current!.rev)} on the server; you are editing rev ${shortRev(editing.rev)}. Saving will show the conflict.`
    : "";
  renderHistory();
}

function closeEditor(): void {
  editing = undefined;
  ui.editor.hidden = true;
}

async function newDocument(): Promise<void> {
  if (!api) return;
  try {
    const [id] = (await api.newId({})).ids;
    openEditor(id!, "", {});
    ui.editorBody.value = "{\n  \n}";
    ui.editorBody.focus();
  } catch (err) {
    log(`cannot get a new id: ${describeError(err)}`, "error");
  }
}

function parseBody(text: string): JsonObject | undefined {
  try {
    const value = JSON.parse(text) as unknown;
    if (value !== null && typeof value === "object" && !Array.isArray(value)) return value as JsonObject;
  } catch {
    // reported below
  }
  ui.editorMessage.textContent = "The body must be a JSON object.";
  return undefined;
}

/**
 * Asks the user what to write after a conflict: resolves with the body to
 * write on top of the server's current revision, or undefined to give up.
 */
function resolveConflict(base: JsonObject, mine: JsonObject, theirs: Document | undefined, conflict: Conflict): Promise<JsonObject | undefined> {
  log(`conflict on ${conflict.id}: the server is at rev ${conflict.currentRev ? shortRev(conflict.currentRev) : "(deleted)"}`, "warn");
  ui.conflictId.textContent = conflict.id;
  ui.conflictBaseRev.textContent = editing?.rev ? shortRev(editing.rev) : "new";
  ui.conflictMine.textContent = pretty(mine);
  ui.conflictTheirs.textContent = pretty(theirs?.body);
  ui.conflictTheirsRev.textContent = conflict.currentRev || "(deleted)";
  ui.conflictTheirs.dataset["rev"] = conflict.currentRev;
  ui.conflictMergeBox.hidden = true;
  ui.conflictConfirm.hidden = true;
  ui.conflictMerge.hidden = false;
  ui.conflict.hidden = false;
  return new Promise((resolve) => {
    const done = (result: JsonObject | undefined) => {
      ui.conflict.hidden = true;
      ui.conflictMerge.onclick = ui.conflictConfirm.onclick = ui.conflictOverwrite.onclick = ui.conflictDiscard.onclick = null;
      resolve(result);
    };
    ui.conflictMerge.onclick = () => {
      ui.conflictMerged.value = pretty(overlayChanges(base, mine, theirs?.body ?? {}));
      ui.conflictMergeBox.hidden = false;
      ui.conflictMerge.hidden = true;
      ui.conflictConfirm.hidden = false;
    };
    ui.conflictConfirm.onclick = () => {
      try {
        const merged = JSON.parse(ui.conflictMerged.value) as JsonObject;
        log(`merging ${conflict.id} onto rev ${shortRev(conflict.currentRev)}`);
        done(merged);
      } catch {
        ui.conflictMerged.classList.add("invalid");
      }
    };
    ui.conflictOverwrite.onclick = () => {
      log(`overwriting ${conflict.id} with yours onto rev ${shortRev(conflict.currentRev)}`);
      done(mine);
    };
    ui.conflictDiscard.onclick = () => done(undefined);
  });
}

async function save(): Promise<void> {
  if (!editing || !sync || !openDb) return;
  const body = parseBody(ui.editorBody.value);
  if (!body) return;
  const { id } = editing;
  const db = openDb.name;
  // The version the next merge compares yours with: first the one you
  // edited, then after each round the server's version you merged onto.
  let base = editing.base;
  ui.save.disabled = true;
  ui.editorMessage.textContent = "saving…";
  try {
    const res = await sync.putWithMerge(db, { id, rev: editing.rev, body }, async (mine, theirs, conflict) => {
      const decided = await resolveConflict(base, mine, theirs, conflict);
      base = theirs?.body ?? {};
      return decided;
    });
    replica?.remember(id, res.rev, res.body);
    log(`saved ${id} at rev ${shortRev(res.rev)} (seq ${res.seq})${res.attempts > 1 ? " after resolving the conflict" : ""}`, "ok");
    openEditor(id, res.rev, res.body);
    ui.editorMessage.textContent = `saved rev ${shortRev(res.rev)}`;
  } catch (err) {
    const conflict = conflictOf(err);
    if (conflict) {
      log(`kept the server's version of ${id}; your change was discarded`, "warn");
      if (conflict.current) {
        replica?.remember(id, conflict.current.rev, conflict.current.body ?? {});
        openEditor(id, conflict.current.rev, conflict.current.body ?? {});
      } else closeEditor();
    } else {
      ui.editorMessage.textContent = describeError(err);
      log(`cannot save ${id}: ${describeError(err)}`, "error");
    }
  } finally {
    ui.save.disabled = false;
  }
}

// ---- wiring ----------------------------------------------------------------

ui.connect.addEventListener("click", () => void connect());
ui.refreshDbs.addEventListener("click", () => void refreshDatabases().catch((err) => log(describeError(err), "error")));
ui.dbSelect.addEventListener("change", () => void (ui.dbSelect.value ? openDatabase(ui.dbSelect.value) : closeDatabase()));
ui.createDb.addEventListener("click", () => void createDatabase());
ui.newDoc.addEventListener("click", () => void newDocument());
ui.save.addEventListener("click", () => void save());
ui.closeEditor.addEventListener("click", () => {
  closeEditor();
  renderDocs();
});
ui.editorHistory.addEventListener("change", () => {
  if (!editing) return;
  const rev = ui.editorHistory.value;
  openEditor(editing.id, rev, replica?.history.get(editing.id)?.get(rev) ?? {});
});
window.addEventListener("pagehide", () => void sync?.stop());

// A page that was connected comes back where it was: same server, same database.
const lastDb = localStorage.getItem(DATABASE_KEY);
if (localStorage.getItem(SERVER_KEY)) {
  void connect().then((ok) => {
    if (ok && lastDb && databases.some((d) => d.name === lastDb)) void openDatabase(lastDb);
  });
}
