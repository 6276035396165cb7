// The agsync web demo: an offline-first todo list on @agsync/web's replica.
//
// The list lives in IndexedDB: the page shows it at once, online or not,
// and every edit applies at once and waits in the outbox (stored with it)
// until the server has it. One tab of the browser holds the connection
// (Web Locks); the others follow through IndexedDB and a BroadcastChannel.
// A service worker (sw.js) keeps the page itself, so it reloads offline.
// Conflicts merge field by field (the server wins an overlap); what was
// merged or rejected is shown in the activity list.
//
// Everything a test needs is in the DOM (data-testid, data-* attributes)
// and in `window.agsyncDemo`.
import {
  createAgsyncTransport,
  indexedDbStore,
  openReplica,
  type JsonObject,
  type Replica,
  type ReplicaDocument,
  type ReplicaStatus,
  type WriteOutcome,
} from "@agsync/web";

function el<T extends HTMLElement = HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`missing element #${id}`);
  return found as T;
}

const ui = {
  connection: el("connection"),
  role: el("role"),
  pending: el("pending"),
  seq: el("seq"),
  lastError: el("last-error"),
  server: el("server"),
  form: el<HTMLFormElement>("add-form"),
  title: el<HTMLInputElement>("new-title"),
  list: el<HTMLUListElement>("todos"),
  count: el("count"),
  log: el<HTMLUListElement>("log"),
};

const params = new URLSearchParams(location.search);
const serverUrl = params.get("server") ?? localStorage.getItem("agsync-demo.server") ?? "http://127.0.0.1:50051";
localStorage.setItem("agsync-demo.server", serverUrl);
const database = params.get("db") ?? "todos";
ui.server.textContent = `${serverUrl} · ${database}`;

interface Todo {
  title: string;
  done: boolean;
  created: number;
}

function asTodo(body: JsonObject): Todo {
  return {
    title: typeof body.title === "string" ? body.title : "",
    done: body.done === true,
    created: typeof body.created === "number" ? body.created : 0,
  };
}

function log(text: string, kind = "info"): void {
  const li = document.createElement("li");
  li.dataset.testid = "log-entry";
  li.dataset.kind = kind;
  li.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  ui.log.prepend(li);
  while (ui.log.children.length > 60) ui.log.lastElementChild?.remove();
}

function describe(outcome: WriteOutcome): string {
  switch (outcome.kind) {
    case "applied":
      return `saved ${outcome.id} (${outcome.deleted ? "deleted, " : ""}rev ${outcome.rev.slice(0, 10)}…)`;
    case "merged":
      return `merged ${outcome.id} with the server's version${outcome.replacedBy ? ", sending the result" : " (nothing left to send)"}`;
    case "rejected":
      return `rejected ${outcome.id}: ${outcome.message} (${outcome.reason})`;
  }
}

// ---- rendering ---------------------------------------------------------------

let replica: Replica;

function render(): void {
  const docs = replica.all(database).sort((a, b) => asTodo(a.body).created - asTodo(b.body).created || (a.id < b.id ? -1 : 1));
  const existing = new Map([...ui.list.children].map((li) => [(li as HTMLElement).dataset.id!, li as HTMLLIElement]));
  const fragment: HTMLLIElement[] = [];
  for (const doc of docs) {
    const li = existing.get(doc.id) ?? row(doc.id);
    existing.delete(doc.id);
    fill(li, doc);
    fragment.push(li);
  }
  for (const li of existing.values()) li.remove();
  // Keep the order; move only what is out of place (so a focused input keeps focus).
  fragment.forEach((li, i) => {
    if (ui.list.children[i] !== li) ui.list.insertBefore(li, ui.list.children[i] ?? null);
  });
  ui.count.textContent = String(docs.length);
  ui.list.dataset.empty = docs.length === 0 ? "true" : "false";
}

function row(id: string): HTMLLIElement {
  const li = document.createElement("li");
  li.dataset.testid = "todo";
  li.dataset.id = id;
  li.innerHTML = `
    <input type="checkbox" data-testid="todo-done" aria-label="done" />
    <input type="text" data-testid="todo-title" spellcheck="false" aria-label="title" />
    <span class="tag" data-testid="todo-pending" title="not on the server yet">pending</span>
    <button type="button" class="icon" data-testid="todo-delete" title="Delete">✕</button>`;
  const done = li.querySelector<HTMLInputElement>('[data-testid="todo-done"]')!;
  const title = li.querySelector<HTMLInputElement>('[data-testid="todo-title"]')!;
  done.addEventListener("change", () => void edit(id, { done: done.checked }));
  title.addEventListener("change", () => void edit(id, { title: title.value }));
  title.addEventListener("keydown", (e) => {
    if (e.key === "Enter") title.blur();
  });
  li.querySelector('[data-testid="todo-delete"]')!.addEventListener("click", () => void remove(id));
  return li;
}

function fill(li: HTMLLIElement, doc: ReplicaDocument): void {
  const todo = asTodo(doc.body);
  li.dataset.title = todo.title;
  li.dataset.done = String(todo.done);
  li.dataset.pending = String(doc.pending);
  li.dataset.rev = doc.rev;
  li.classList.toggle("done", todo.done);
  li.classList.toggle("pending", doc.pending);
  li.classList.toggle("failed", doc.failed);
  const done = li.querySelector<HTMLInputElement>('[data-testid="todo-done"]')!;
  const title = li.querySelector<HTMLInputElement>('[data-testid="todo-title"]')!;
  done.checked = todo.done;
  if (document.activeElement !== title) title.value = todo.title;
}

let lastConnection = "";
function renderStatus(status: ReplicaStatus): void {
  if (status.connection !== lastConnection && lastConnection !== "") log(`now ${status.connection}`, status.connection === "offline" ? "error" : "info");
  lastConnection = status.connection;
  ui.connection.textContent = status.connection;
  ui.connection.dataset.state = status.connection;
  ui.role.textContent = status.leader ? "this tab syncs" : "follows another tab";
  ui.role.dataset.leader = String(status.leader);
  ui.pending.textContent = String(status.pending);
  ui.seq.textContent = status.lastSyncedSeq === undefined ? "–" : status.lastSyncedSeq.toString();
  // The last error matters while something is wrong; once online it is history.
  ui.lastError.textContent = status.lastError && status.connection !== "online" ? `last error: ${status.lastError.message}` : "";
  ui.lastError.title = status.lastError ? new Date(status.lastError.at).toLocaleTimeString() : "";
}

// ---- writes --------------------------------------------------------------------

async function edit(id: string, patch: Partial<Todo>): Promise<void> {
  const current = replica.get(database, id);
  if (!current) return;
  try {
    await replica.put(database, id, { ...current.body, ...patch });
  } catch (err) {
    log(`not saved: ${err instanceof Error ? err.message : String(err)}`, "error");
  }
}

async function add(title: string): Promise<string> {
  const id = crypto.randomUUID().replaceAll("-", "");
  await replica.put(database, id, { title, done: false, created: Date.now() });
  return id;
}

async function remove(id: string): Promise<void> {
  await replica.delete(database, id);
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const title = ui.title.value.trim();
  if (!title) return;
  ui.title.value = "";
  void add(title).catch((err: unknown) => log(`not saved: ${err instanceof Error ? err.message : String(err)}`, "error"));
});

// ---- start -----------------------------------------------------------------------

if ("serviceWorker" in navigator) {
  // The page itself, for reloads without a network.
  navigator.serviceWorker.register("sw.js").catch((err: unknown) => log(`no offline page: ${String(err)}`, "error"));
}

const outcomes: WriteOutcome[] = [];
replica = await openReplica({
  transport: createAgsyncTransport({ baseUrl: serverUrl }),
  databases: [database],
  store: indexedDbStore(`agsync-demo:${database}`),
  onOutcome: (outcome) => {
    outcomes.push(outcome);
    log(describe(outcome), outcome.kind);
  },
});
replica.subscribe(render);
replica.onStatus(renderStatus);
render();
renderStatus(replica.status);
log(`opened the local replica: ${replica.all(database).length} todos, ${replica.status.pending} pending edits`);
ui.title.disabled = false;
document.body.dataset.ready = "true";

declare global {
  interface Window {
    agsyncDemo: unknown;
  }
}

/** For tests and the console. */
window.agsyncDemo = {
  replica,
  database,
  outcomes,
  add,
  edit,
  remove,
  todos: () => replica.all(database).map((d) => ({ id: d.id, rev: d.rev, pending: d.pending, ...asTodo(d.body) })),
  status: () => ({ ...replica.status, lastSyncedSeq: replica.status.lastSyncedSeq?.toString() }),
  whenSynced: (timeoutMs = 30_000) => replica.whenSynced({ signal: AbortSignal.timeout(timeoutMs) }),
};
