/**
 * The offline-first replica: {@link openReplica}. Reads answer from the
 * local copy at once; writes apply to it at once and queue in a durable
 * outbox in the same local transaction; the leader tab uploads the outbox
 * ({@link Uploader}) and pulls remote changes ({@link SyncClient}), and the
 * other tabs follow through the shared storage and a BroadcastChannel.
 *
 * This module wires the parts together and owns the public surface; the
 * rules of the outbox live in `outbox.ts`, the view in `local.ts`, merges
 * in `resolve.ts`. It never opens a second Subscribe stream for one storage:
 * only the holder of the storage's Web Lock runs a SyncClient.
 *
 * @module
 */
import type { JsonObject, JsonValue } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";
import { backoffDelay, type BackoffOptions } from "./backoff.js";
import { realClock, sleepUnless, uuid, WOKEN, type Clock } from "./clock.js";
import { SyncService } from "./gen/agsync/v1/sync_pb.js";
import { LocalState, type LocalChanges, type ReplicaDocument, type StorageOp } from "./local.js";
import { Uploader, type Rejection, type RejectionDecision, type UploaderState, type WriteOutcome } from "./outbox.js";
import { fieldMerge, type Resolver } from "./resolve.js";
import { formatStoredState, parseStoredState, type SyncState, type SyncStateStore } from "./store.js";
import { SyncClient, type ChangesBatch, type SyncClientOptions, type SyncStatus } from "./sync-client.js";
import { META_POSITION, storageError, type OutboxRow, type ReplicaStorage } from "./storage.js";

export type { ReplicaDocument } from "./local.js";

/** Asked for a bearer token before the first call, and again (`refresh: true`) after UNAUTHENTICATED. */
export type TokenProvider = (request: { refresh: boolean }) => string | null | undefined | Promise<string | null | undefined>;

/** A change of a visible document (undefined: it is gone). */
export interface DocumentChange {
  database: string;
  id: string;
  doc: ReplicaDocument | undefined;
}

/** An error as the status shows it (plain data: it crosses tabs). */
export interface ReplicaError {
  /** "ReplicaStorageError" (with `quota`), "ConnectError" (with `code`), ... */
  name: string;
  message: string;
  /** The gRPC code's name, for server errors ("unavailable", "unauthenticated", ...). */
  code?: string | undefined;
  /** True when local storage is full. */
  quota?: boolean | undefined;
  /** When it happened (ms since the epoch). */
  at: number;
}

/** Where the replica is, for a UI. */
export interface ReplicaStatus {
  /**
   * - "online": the stream is live and nothing waits to be uploaded;
   * - "syncing": connecting, catching up, or uploading;
   * - "offline": the server cannot be reached (retrying with backoff), or the stream stopped.
   */
  connection: "online" | "syncing" | "offline";
  /** Whether this tab holds the connection (the others follow it). */
  leader: boolean;
  /** The leader's Subscribe stream ("unknown" in a tab that has not heard from a leader yet). */
  stream: SyncStatus["state"] | "unknown";
  /** Local edits not yet on the server (every tab's), kept failed ones included. */
  pending: number;
  /** Of those, edits rejected and kept by the app: they wait for {@link Replica.retryFailed} or {@link Replica.discard}. */
  failed: number;
  /** The seq the replica is synced up to (the sync position); undefined before the first sync. */
  lastSyncedSeq: bigint | undefined;
  /** The last error (a failed call, storage, a rejected edit's), if any. */
  lastError: ReplicaError | undefined;
}

/** A database to replicate, by name (its sync key is then its name) or with its sync key. */
export type DatabaseSpec = string | { name: string; syncKey: string };

/** Options of {@link openReplica}. */
export interface ReplicaOptions {
  /** From {@link createAgsyncTransport} (browsers) or connect-node's transports (Node). */
  transport: Transport;
  /** The databases to replicate (at least one); they share one Subscribe stream. */
  databases: DatabaseSpec[];
  /** Where the replica lives: `indexedDbStore(name)` (browsers), `sqliteStore(path)` (Node, from `@agsync/web/sqlite`), `memoryStore()`. */
  store: ReplicaStorage;
  /** Decides conflicts (three-way); default {@link fieldMerge}() (disjoint fields combine, the server wins overlaps). */
  resolve?: Resolver;
  /**
   * A local edit the server refused for good (or a resolver rejected):
   * return "keep" to keep it (marked failed, not sent until
   * {@link Replica.retryFailed}), or "drop" (the default). Called in the
   * leader tab; every tab gets the outcome through `onOutcome`.
   */
  onRejected?: (rejection: Rejection) => RejectionDecision | void | Promise<RejectionDecision | void>;
  /** How each edit ended: applied, merged or rejected (in every tab). */
  onOutcome?: (outcome: WriteOutcome) => void;
  /** A bearer token; asked again after UNAUTHENTICATED (refresh), then the stream and uploads resume. */
  getToken?: TokenProvider;
  /** Subscribe's alias (leave empty with --auth). */
  alias?: string;
  /** Retry delays, of the stream and of uploads. Default 500 ms doubling to 30 s, with jitter. */
  backoff?: BackoffOptions;
  /** Most documents per BulkPut (default 1000) and bytes, roughly (default 1 MiB). */
  maxBatch?: number;
  maxBatchBytes?: number;
  /** Timeout of each call but Subscribe, ms. Default 30000. */
  callTimeoutMs?: number;
  /** Changes page size; 0 (default) is the server's. */
  pageSize?: number;
  /** Load a database from the beginning with a Snapshot stream (default true); see {@link SyncClientOptions.snapshot}. */
  snapshot?: boolean;
  /**
   * How tabs agree on a leader: by default Web Locks and BroadcastChannel
   * when the storage is shared (IndexedDB) and the browser has both, else
   * this replica leads alone. Tests pass their own.
   */
  coordination?: Coordination | "solo";
  /** For tests: time, and the jitter's random source. */
  clock?: Clock;
  random?: () => number;
}

/** Leader election and messages between tabs (Web Locks and BroadcastChannel in browsers). */
export interface Coordination {
  /** Like navigator.locks.request(name, fn): calls `fn` once this page holds the lock, holds it until fn's promise settles. */
  lock(name: string, fn: () => Promise<void>): Promise<void>;
  /** Like new BroadcastChannel(name). */
  channel(name: string): CoordinationChannel;
}

/** The part of BroadcastChannel a replica uses. */
export interface CoordinationChannel {
  postMessage(message: unknown): void;
  onmessage: ((event: { data: unknown }) => void) | null;
  close(): void;
}

/** The browser's coordination, if it has Web Locks and BroadcastChannel. */
function browserCoordination(): Coordination | undefined {
  const locks = (globalThis.navigator as { locks?: { request(name: string, fn: () => Promise<void>): Promise<void> } } | undefined)?.locks;
  if (!locks || typeof globalThis.BroadcastChannel !== "function") return undefined;
  return {
    lock: (name, fn) => locks.request(name, fn),
    channel: (name) => new BroadcastChannel(name) as unknown as CoordinationChannel,
  };
}

/** Messages between tabs. */
type TabMessage =
  | { type: "ops"; from: string; ops: StorageOp[] }
  | { type: "hello"; from: string }
  | { type: "status"; from: string; stream: SyncStatus["state"]; uploader: UploaderState["state"]; lastError: ReplicaError | undefined }
  | { type: "outcome"; from: string; outcome: WriteOutcome };

/** Adds `authorization: Bearer <token>` to every call of a transport. */
function withToken(transport: Transport, token: () => Promise<string | null | undefined>): Transport {
  const headers = async (init: HeadersInit | undefined) => {
    const header = new Headers(init);
    const value = await token();
    if (value) header.set("authorization", `Bearer ${value}`);
    return header;
  };
  return {
    unary: async (method, signal, timeoutMs, header, input, contextValues) =>
      transport.unary(method, signal, timeoutMs, await headers(header), input, contextValues),
    stream: async (method, signal, timeoutMs, header, input, contextValues) =>
      transport.stream(method, signal, timeoutMs, await headers(header), input, contextValues),
  };
}

/** Checks that `value` is JSON a Struct can hold (finite numbers, no undefined), and copies it. */
function jsonCopy(value: unknown, path: string): JsonValue {
  if (value === null || typeof value === "string" || typeof value === "boolean") return value;
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new TypeError(`${path} is ${value}: numbers must be finite`);
    return value;
  }
  if (Array.isArray(value)) return value.map((v, i) => jsonCopy(v, `${path}[${i}]`));
  if (typeof value === "object") {
    const proto = Object.getPrototypeOf(value);
    if (proto !== Object.prototype && proto !== null) throw new TypeError(`${path} is not a plain object (a JSON object is needed)`);
    const out: JsonObject = {};
    for (const [key, v] of Object.entries(value)) {
      if (v === undefined) continue;
      out[key] = jsonCopy(v, `${path}.${key}`);
    }
    return out;
  }
  throw new TypeError(`${path} is a ${typeof value}: only JSON values can be stored`);
}

function toReplicaError(err: unknown, clock: Clock): ReplicaError {
  if (err instanceof ConnectError) {
    return { name: "ConnectError", message: err.message, code: Code[err.code]?.replace(/[A-Z]/g, (c, i: number) => (i ? "_" : "") + c).toLowerCase(), at: clock.now() };
  }
  const e = err as { name?: string; message?: string; quota?: boolean } | null;
  return { name: e?.name ?? "Error", message: e?.message ?? String(err), quota: e?.quota, at: clock.now() };
}

/** Opens a replica (see {@link Replica}): reads the local copy, then syncs in the background. */
export async function openReplica(options: ReplicaOptions): Promise<Replica> {
  const replica = new Replica(options);
  await replica.open();
  return replica;
}

/** What {@link Replica.put} and {@link Replica.delete} queued. */
export interface WriteReceipt {
  /** The edit's request id (outcomes and rejections name it). */
  requestId: string;
  database: string;
  id: string;
}

/**
 * A local replica of agsync databases. Get one with {@link openReplica}.
 * Reads are synchronous and answer from the local copy; writes resolve once
 * the edit is stored durably (it is visible before).
 */
export class Replica {
  readonly #o: ReplicaOptions;
  readonly #local: LocalState;
  readonly #clock: Clock;
  readonly #names: string[];
  readonly #syncKeys: string[];
  readonly #tabId = uuid().slice(0, 8);
  readonly #docListeners = new Set<(changes: DocumentChange[]) => void>();
  readonly #statusListeners = new Set<(status: ReplicaStatus) => void>();
  readonly #waiters = new Set<() => void>();
  /** The generated client (with the token), for other calls. */
  readonly api: Client<typeof SyncService>;
  #token: Promise<string | null | undefined> | undefined;
  #channel: CoordinationChannel | undefined;
  #buffered: StorageOp[][] | undefined;
  #releaseLock: (() => void) | undefined;
  #leader = false;
  #sync: SyncClient | undefined;
  #uploader: Uploader | undefined;
  #stream: SyncStatus["state"] | "unknown" = "unknown";
  #uploaderState: UploaderState["state"] = "stopped";
  #lastError: ReplicaError | undefined;
  #closed = false;
  #closing = new AbortController();
  #online = new AbortController();
  #lastKeyTime = 0;
  #keyCounter = 0;
  #touched = new Map<string, [string, string]>();
  #flushScheduled = false;
  #status: ReplicaStatus;
  #authAttempt = 0;

  constructor(options: ReplicaOptions) {
    if (options.databases.length === 0) throw new Error("openReplica needs at least one database");
    this.#o = options;
    this.#clock = options.clock ?? realClock;
    const specs = options.databases.map((d) => (typeof d === "string" ? { name: d, syncKey: d } : d));
    this.#names = [...new Set(specs.map((d) => d.name))].sort();
    this.#syncKeys = [...new Set(specs.map((d) => d.syncKey))].sort();
    this.#local = new LocalState(options.store);
    const transport = options.getToken ? withToken(options.transport, () => this.#currentToken()) : options.transport;
    this.api = createClient(SyncService, transport);
    this.#status = this.#computeStatus();
  }

  // ---- opening, leading, following, closing -------------------------------------

  /** @internal Use {@link openReplica}. */
  async open(): Promise<void> {
    const coordination = this.#o.coordination === "solo" ? undefined : (this.#o.coordination ?? browserCoordination());
    const shared = this.#o.store.sharedName;
    this.#local.listen((changes) => this.#onLocal(changes));
    this.#local.onCommitted = (ops) => this.#post({ type: "ops", from: this.#tabId, ops });
    if (shared !== undefined && coordination) {
      this.#channel = coordination.channel(`agsync:${shared}`);
      this.#channel.onmessage = (event) => this.#onMessage(event.data as TabMessage);
      await this.#reload();
      this.#post({ type: "hello", from: this.#tabId });
      void coordination
        .lock(`agsync:${shared}`, () => {
          if (this.#closed) return Promise.resolve();
          return new Promise<void>((release) => {
            this.#releaseLock = release;
            void this.#lead().catch((err: unknown) => this.#error(err));
          });
        })
        .catch((err: unknown) => this.#error(err));
    } else {
      await this.#reload();
      await this.#lead();
    }
    if (typeof globalThis.addEventListener === "function") globalThis.addEventListener("online", this.#onOnline);
  }

  #onOnline = (): void => {
    this.#online.abort(WOKEN);
    this.#online = new AbortController();
    this.#uploader?.retryNow();
  };

  /** Reads the storage into memory; ops from other tabs arriving meanwhile are applied after. */
  async #reload(): Promise<void> {
    this.#buffered = [];
    try {
      await this.#local.load();
    } finally {
      const buffered = this.#buffered;
      this.#buffered = undefined;
      for (const ops of buffered) this.#local.apply(ops);
    }
  }

  async #lead(): Promise<void> {
    if (this.#closed) return;
    this.#leader = true;
    this.#stream = "unknown"; // what the previous leader said no longer holds
    this.#uploaderState = "stopped";
    // The previous leader's last writes may not have reached this tab.
    if (this.#channel) await this.#reload();
    const position: SyncStateStore = {
      get: () => parseStoredState(this.#local.meta(META_POSITION) ?? null),
      set: (state: SyncState) => this.#savePosition(formatStoredState(state)),
    };
    const sleep = (ms: number, signal: AbortSignal) => sleepUnless(this.#clock, ms, signal, this.#online.signal);
    this.#sync = new SyncClient({
      transport: this.#o.getToken ? withToken(this.#o.transport, () => this.#currentToken()) : this.#o.transport,
      syncKeys: this.#syncKeys,
      databases: this.#names,
      store: position,
      alias: this.#o.alias ?? "",
      pageSize: this.#o.pageSize ?? 0,
      ...(this.#o.snapshot !== undefined ? { snapshot: this.#o.snapshot } : {}),
      ...(this.#o.backoff ? { backoff: this.#o.backoff } : {}),
      ...(this.#o.callTimeoutMs ? { callTimeoutMs: this.#o.callTimeoutMs } : {}),
      ...(this.#o.random ? { random: this.#o.random } : {}),
      sleep,
      onChanges: (batch) => this.#applyRemote(batch),
      onDatabaseDeleted: (database) => this.#databaseDeleted(database),
      onStatus: (status) => this.#onStream(status),
      onError: (error) => this.#error(error),
    });
    this.#uploader = new Uploader({
      api: this.api,
      local: this.#local,
      resolve: this.#o.resolve ?? fieldMerge(),
      onRejected: this.#o.onRejected,
      onOutcome: (outcome) => {
        this.#o.onOutcome?.(outcome);
        this.#post({ type: "outcome", from: this.#tabId, outcome });
        if (outcome.kind === "rejected") this.#error(new Error(`edit of ${outcome.database}/${outcome.id} rejected (${outcome.reason}): ${outcome.message}`), "RejectedEdit");
      },
      onState: (state) => {
        this.#uploaderState = state.state;
        this.#changed();
      },
      onError: (error) => this.#error(error),
      refreshToken: this.#o.getToken ? () => this.#refreshToken() : undefined,
      clock: this.#clock,
      backoff: this.#o.backoff,
      random: this.#o.random,
      maxBatch: this.#o.maxBatch,
      maxBatchBytes: this.#o.maxBatchBytes,
      callTimeoutMs: this.#o.callTimeoutMs,
    });
    this.#sync.start();
    this.#uploader.start();
    this.#changed();
  }

  #positionToWrite: string | undefined;
  #positionWriter: Promise<void> | undefined;

  /**
   * Saves the sync position: in memory at once, in storage soon after. The
   * SyncClient saves it after every notification (for our own uploads, one
   * per document): one transaction each would make the stream as slow as
   * the storage's commits. Writing only the latest position is safe: it
   * only ever names data already committed (a position lost in a crash
   * means changes are loaded again, and applying them twice is harmless).
   */
  #savePosition(text: string): void {
    if (this.#local.meta(META_POSITION) === text) return;
    this.#local.apply([{ op: "meta", key: META_POSITION, value: text }]);
    this.#positionToWrite = text;
    this.#positionWriter ??= (async () => {
      try {
        while (this.#positionToWrite !== undefined) {
          const value = this.#positionToWrite;
          this.#positionToWrite = undefined;
          await this.#local.transaction("cannot save the sync position", async (tx) => tx.setMeta(META_POSITION, value));
        }
      } catch (err) {
        this.#error(err);
      } finally {
        this.#positionWriter = undefined;
      }
    })();
  }

  #post(message: TabMessage): void {
    try {
      this.#channel?.postMessage(message);
    } catch {
      // The channel is closed (the replica is closing).
    }
  }

  #onMessage(message: TabMessage): void {
    if (this.#closed || message.from === this.#tabId) return;
    switch (message.type) {
      case "ops":
        if (this.#buffered) this.#buffered.push(message.ops);
        else this.#local.apply(message.ops);
        if (this.#leader && message.ops.some((op) => op.op === "outbox")) this.#uploader?.wake();
        return;
      case "hello":
        if (this.#leader) this.#announce();
        return;
      case "status":
        if (this.#leader) return;
        this.#stream = message.stream;
        this.#uploaderState = message.uploader;
        if (message.lastError) this.#lastError = message.lastError;
        this.#changed();
        return;
      case "outcome":
        this.#o.onOutcome?.(message.outcome);
        return;
    }
  }

  #announce(): void {
    this.#post({ type: "status", from: this.#tabId, stream: this.#stream as SyncStatus["state"], uploader: this.#uploaderState, lastError: this.#lastError });
  }

  /** Stops syncing (leadership passes to another tab) and closes the storage. Pending edits stay stored. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#closing.abort();
    if (typeof globalThis.removeEventListener === "function") globalThis.removeEventListener("online", this.#onOnline);
    await this.#uploader?.stop();
    await this.#sync?.stop();
    await this.#positionWriter;
    this.#leader = false;
    this.#releaseLock?.();
    this.#channel?.close();
    for (const wake of this.#waiters) wake();
    await this.#local.serial(() => this.#o.store.close());
  }

  // ---- tokens ----------------------------------------------------------------------

  #currentToken(): Promise<string | null | undefined> {
    this.#token ??= Promise.resolve(this.#o.getToken!({ refresh: false }));
    return this.#token;
  }

  async #refreshToken(): Promise<void> {
    const next = Promise.resolve(this.#o.getToken!({ refresh: true }));
    this.#token = next;
    await next;
  }

  // ---- the stream's side ---------------------------------------------------------

  #onStream(status: SyncStatus): void {
    const was = this.#stream;
    this.#stream = status.state;
    if (status.state === "live" && was !== "live") {
      // Back in touch with the server: uploads need not wait out their backoff.
      this.#authAttempt = 0;
      this.#uploader?.retryNow();
    }
    this.#changed();
    if (status.state === "stopped" && status.error?.code === Code.Unauthenticated && this.#o.getToken && !this.#closed) {
      // A token refresh, then the stream resumes from its saved position.
      const delayMs = backoffDelay(this.#authAttempt, this.#o.backoff, this.#o.random);
      this.#authAttempt += 1;
      void (async () => {
        try {
          await this.#refreshToken();
        } catch (err) {
          this.#error(err);
        }
        await sleepUnless(this.#clock, delayMs, this.#closing.signal);
        if (!this.#closed && this.#leader) this.#sync?.start();
      })();
    }
  }

  /** A page of remote changes: the server's state moves on; pending edits stay on top. */
  #applyRemote(batch: ChangesBatch): Promise<void> {
    return this.#local.serial(() =>
      this.#local.transaction("cannot save pulled changes", async (tx) => {
        // Requests are issued together and awaited once (IndexedDB runs them in order).
        const writes: (void | Promise<void>)[] = [];
        if (batch.reset) writes.push(tx.clearDocs(batch.database));
        for (const change of batch.changes) {
          if (!batch.reset) {
            // Our own upload's echo (or anything older than what we know) is not applied again.
            const known = this.#local.doc(batch.database, change.id);
            if (known && known.seq >= change.seq) continue;
          }
          writes.push(
            tx.putDoc({
              database: batch.database,
              id: change.id,
              rev: change.rev,
              seq: change.seq,
              deleted: change.deleted,
              body: change.deleted ? null : (change.body ?? {}),
            }),
          );
        }
        await Promise.all(writes);
      }),
    );
  }

  /** The database was deleted: its copy goes, and its pending edits are reported as rejected. */
  async #databaseDeleted(database: string): Promise<void> {
    await this.#local.serial(() => this.#local.transaction("cannot drop a deleted database", async (tx) => tx.clearDocs(database)));
    const entries = [...this.#local.outbox()].filter((row) => row.database === database);
    for (const row of entries) {
      await this.#uploader?.reject(row.key, row.requestId, {
        reason: "database-deleted",
        message: `database ${JSON.stringify(database)} was deleted on the server`,
      });
    }
  }

  // ---- reads -----------------------------------------------------------------------

  #checkDatabase(database: string): void {
    if (!this.#names.includes(database)) {
      throw new Error(`database ${JSON.stringify(database)} is not replicated here (open the replica with it in \`databases\`)`);
    }
  }

  /** A document as the app sees it now (the server's state with the pending edits on top), or undefined. */
  get(database: string, id: string): ReplicaDocument | undefined {
    this.#checkDatabase(database);
    return this.#local.view(database, id);
  }

  /** Every visible document of a database, ordered by id; with `where`, those it accepts. */
  all(database: string, where?: (doc: ReplicaDocument) => boolean): ReplicaDocument[] {
    this.#checkDatabase(database);
    const docs = this.#local.viewAll(database);
    return where ? docs.filter(where) : docs;
  }

  /** The pending edits, in upload order. */
  pendingWrites(): Readonly<OutboxRow>[] {
    return [...this.#local.outbox()];
  }

  /**
   * Calls `listener` after every change of visible documents (local edits at
   * once, remote changes as they arrive, other tabs' edits), with the
   * documents that changed. Returns the unsubscribe function.
   */
  subscribe(listener: (changes: DocumentChange[]) => void): () => void {
    this.#docListeners.add(listener);
    return () => this.#docListeners.delete(listener);
  }

  /** Calls `listener` on every status change; returns the unsubscribe function. */
  onStatus(listener: (status: ReplicaStatus) => void): () => void {
    this.#statusListeners.add(listener);
    return () => this.#statusListeners.delete(listener);
  }

  /** The status now. */
  get status(): ReplicaStatus {
    return this.#status;
  }

  #onLocal(changes: LocalChanges): void {
    for (const [database, id] of changes.docs) this.#touched.set(`${database}\u0000${id}`, [database, id]);
    if (this.#touched.size > 0 && !this.#flushScheduled) {
      this.#flushScheduled = true;
      queueMicrotask(() => this.#flush());
    }
    if (changes.outbox || changes.meta.includes(META_POSITION)) this.#changed();
  }

  #flush(): void {
    this.#flushScheduled = false;
    const touched = [...this.#touched.values()];
    this.#touched.clear();
    if (this.#docListeners.size === 0) return;
    const changes = touched.map(([database, id]) => ({ database, id, doc: this.#local.view(database, id) }));
    for (const listener of this.#docListeners) {
      try {
        listener(changes);
      } catch (err) {
        queueMicrotask(() => {
          throw err;
        });
      }
    }
  }

  #computeStatus(): ReplicaStatus {
    const pending = this.#local.pendingCount;
    const failed = this.#local.failedCount;
    const stream = this.#stream;
    let connection: ReplicaStatus["connection"];
    if (stream === "live") {
      connection = this.#uploaderState === "retrying" ? "offline" : pending - failed > 0 || this.#uploaderState === "uploading" ? "syncing" : "online";
    } else if (stream === "connecting" || stream === "catching-up") {
      connection = "syncing";
    } else {
      connection = "offline";
    }
    return {
      connection,
      leader: this.#leader,
      stream,
      pending,
      failed,
      lastSyncedSeq: this.#position()?.seq,
      lastError: this.#lastError,
    };
  }

  #positionText: string | undefined;
  #positionState: SyncState | undefined;
  /** The saved sync position, parsed once per change. */
  #position(): SyncState | undefined {
    const text = this.#local.meta(META_POSITION);
    if (text !== this.#positionText) {
      this.#positionText = text;
      this.#positionState = parseStoredState(text ?? null);
    }
    return this.#positionState;
  }

  #changed(): void {
    const before = this.#status;
    const status = this.#computeStatus();
    const same =
      before.connection === status.connection &&
      before.leader === status.leader &&
      before.stream === status.stream &&
      before.pending === status.pending &&
      before.failed === status.failed &&
      before.lastSyncedSeq === status.lastSyncedSeq &&
      before.lastError === status.lastError;
    this.#status = status;
    if (!same) {
      for (const listener of this.#statusListeners) listener(status);
      if (this.#leader && (before.stream !== status.stream || before.lastError !== status.lastError || before.connection !== status.connection)) {
        this.#announce();
      }
    }
    for (const wake of [...this.#waiters]) wake();
  }

  #error(err: unknown, name?: string): void {
    this.#lastError = { ...toReplicaError(err, this.#clock), ...(name ? { name } : {}) };
    this.#changed();
  }

  /** Resolves at the next change of anything, or after `ms`. */
  #nextChange(ms: number, signal?: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const abort = new AbortController();
      const done = () => {
        this.#waiters.delete(done);
        abort.abort(WOKEN);
        resolve();
      };
      this.#waiters.add(done);
      void sleepUnless(this.#clock, ms, abort.signal, ...(signal ? [signal] : [])).then(done);
    });
  }

  /**
   * Resolves when the replica is in sync: no edit waits to be uploaded
   * (kept failed ones aside), the stream is live, and every replicated
   * database is loaded up to the server's head (ListDatabases' update_seq).
   * Waits as long as it takes (offline: until back online), unless `signal` aborts (then it rejects).
   */
  async whenSynced(options: { signal?: AbortSignal } = {}): Promise<void> {
    const { signal } = options;
    for (;;) {
      if (signal?.aborted) throw signal.reason ?? new Error("whenSynced aborted");
      if (this.#closed) throw new Error("the replica is closed");
      const s = this.#status;
      if (s.pending - s.failed > 0 || s.stream !== "live" || this.#uploaderState === "uploading") {
        await this.#nextChange(1000, signal);
        continue;
      }
      let heads: Map<string, bigint>;
      try {
        const { databases } = await this.api.listDatabases({}, { timeoutMs: this.#o.callTimeoutMs ?? 30_000, ...(signal ? { signal } : {}) });
        heads = new Map(databases.map((d) => [d.name, d.updateSeq]));
      } catch {
        await this.#nextChange(500, signal);
        continue;
      }
      const position = this.#position();
      let top = 0n;
      const behind = this.#names.some((name) => {
        const head = heads.get(name) ?? 0n;
        if (head > top) top = head;
        return head > 0n && (position?.databases[name] ?? 0n) < head;
      }) || (position?.seq ?? 0n) < top;
      const now = this.#status;
      if (!behind && now.pending - now.failed === 0 && now.stream === "live") return;
      await this.#nextChange(behind ? 200 : 50, signal);
    }
  }

  // ---- writes ----------------------------------------------------------------------

  #newKey(): string {
    const last = this.#local.lastOutboxKey;
    const lastTime = last ? parseInt(last.slice(0, 10), 36) : 0;
    const time = Math.max(this.#clock.now(), lastTime, this.#lastKeyTime);
    this.#keyCounter = time === this.#lastKeyTime ? this.#keyCounter + 1 : 0;
    this.#lastKeyTime = time;
    return `${time.toString(36).padStart(10, "0")}${this.#keyCounter.toString(36).padStart(6, "0")}${this.#tabId}`;
  }

  /**
   * Writes a document: visible at once (marked pending), queued in the
   * outbox in the same local transaction. Resolves once stored durably;
   * rejects (and takes the edit back) if the storage fails, e.g. when it is
   * full ({@link ReplicaStorageError} with `quota`).
   */
  put(database: string, id: string, body: JsonObject): Promise<WriteReceipt> {
    this.#checkWrite(database, id);
    const copy = jsonCopy(body, "body");
    if (typeof copy !== "object" || copy === null || Array.isArray(copy)) throw new TypeError("body must be a JSON object");
    for (const key of Object.keys(copy)) {
      if (key.startsWith("_")) throw new TypeError(`body.${key}: top-level keys starting with "_" are reserved by agsync`);
    }
    return this.#enqueue(database, id, "put", copy);
  }

  /**
   * Deletes a document: gone from the view at once, queued like a put.
   * Resolves to undefined (and queues nothing) when there is no such document.
   */
  delete(database: string, id: string): Promise<WriteReceipt | undefined> {
    this.#checkWrite(database, id);
    if (!this.#local.view(database, id)) return Promise.resolve(undefined);
    return this.#enqueue(database, id, "delete", null);
  }

  #checkWrite(database: string, id: string): void {
    if (this.#closed) throw new Error("the replica is closed");
    this.#checkDatabase(database);
    if (typeof id !== "string" || id === "" || id.startsWith("_")) {
      throw new TypeError(`document id ${JSON.stringify(id)}: it must be a non-empty string not starting with "_"`);
    }
  }

  async #enqueue(database: string, id: string, op: "put" | "delete", body: JsonObject | null): Promise<WriteReceipt> {
    const row: OutboxRow = {
      key: this.#newKey(),
      requestId: uuid(),
      database,
      id,
      op,
      body,
      baseRev: null,
      baseBody: this.#local.view(database, id)?.body ?? null,
      createdAt: this.#clock.now(),
    };
    // Visible now; durable when the transaction commits.
    this.#local.apply([{ op: "outbox", row }]);
    let stored: OutboxRow | undefined;
    try {
      stored = await this.#local.transaction(`cannot save the edit of ${database}/${id}`, async (tx) => {
        const earlier = await tx.outboxOf(database, id);
        const final = { ...row };
        if (earlier.length > 0) {
          // Behind another pending edit of this document: sent after it, based on its result.
          final.baseRev = null;
          const lastKey = earlier[earlier.length - 1]!.key;
          if (lastKey >= final.key) final.key = `${lastKey}0`; // another tab's edit came first
        } else {
          // The server's state as this tab knows it. If another tab knows a
          // newer one, this base is stale: the upload then meets a conflict
          // and merges (never the other way round: memory is never ahead
          // of the storage).
          const doc = this.#local.doc(database, id);
          final.baseRev = doc && !doc.deleted ? doc.rev : "";
        }
        await tx.putOutbox(final);
        return final;
      });
    } catch (err) {
      this.#local.forget(row.key);
      const error = storageError(err, `cannot save the edit of ${database}/${id}`);
      this.#error(error);
      throw error;
    }
    if (stored.key !== row.key) this.#local.forget(row.key);
    this.#uploader?.wake();
    return { requestId: row.requestId, database, id };
  }

  /** Sends the kept failed edits again. */
  async retryFailed(): Promise<void> {
    await this.#local.transaction("cannot retry failed edits", async (tx) => {
      for (const row of await tx.allOutbox()) if (row.failed) await tx.putOutbox({ ...row, failed: undefined });
    });
    this.#uploader?.retryNow();
  }

  /** Drops a kept failed edit (by request id). Only failed edits can be discarded: the others are on their way. */
  async discard(requestId: string): Promise<void> {
    await this.#local.transaction("cannot discard an edit", async (tx) => {
      const row = (await tx.allOutbox()).find((r) => r.requestId === requestId);
      if (!row) return;
      if (!row.failed) throw new Error(`edit ${requestId} is not failed: it is being uploaded and cannot be discarded`);
      await tx.deleteOutbox(row.key);
    });
  }
}
