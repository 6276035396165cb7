/**
 * SyncClient: what every app that keeps a copy of agsync databases needs.
 * One Subscribe stream for all its sync keys; on each notification, the
 * changed database's documents are loaded with Changes (paged, from where
 * the last load ended) and handed to the app; the position is saved in a
 * store the app provides, so a reloaded page resumes with `since` and loads
 * only what changed while it was away. It reconnects with backoff, resyncs
 * from scratch when the server no longer has the events it missed
 * (OUT_OF_RANGE), and never skips a notification.
 *
 * @module
 */
import type { JsonObject } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";
import { backoffDelay, type BackoffOptions } from "./backoff.js";
import { errorInfoOf, seqMetadata } from "./errors.js";
import {
  SyncService,
  type Change,
  type Notification,
  type SubscribeResponse,
} from "./gen/agsync/v1/sync_pb.js";
import { putWithMerge, type DocumentWrite, type MergeFunction, type PutWithMergeOptions, type PutWithMergeResult } from "./merge.js";
import { MemoryStateStore, type SyncState, type SyncStateStore } from "./store.js";

/** One changed document, as Changes lists it (with its body unless deleted). */
export interface ChangedDocument {
  id: string;
  rev: string;
  /** The seq of the document's latest change. */
  seq: bigint;
  deleted: boolean;
  /** The body; undefined when deleted. */
  body: JsonObject | undefined;
}

/** One page of Changes of one database. */
export interface ChangesBatch {
  database: string;
  /** The `since` the page was read from. */
  since: bigint;
  /** The highest seq in the page: the next `since`. */
  lastSeq: bigint;
  /**
   * True when the page starts from the beginning of the database (first
   * load, a resync, or the database was deleted and created again): drop
   * your copy of the database, then apply `changes`. A reset batch may have
   * no changes (the database is empty).
   */
  reset: boolean;
  /** Each changed document once, in seq order. */
  changes: ChangedDocument[];
}

/** Why the client is resyncing from scratch. */
export interface ResyncInfo {
  /** "SINCE_TOO_OLD" (the server's event log no longer reaches back to the saved seq) or "SINCE_AHEAD" (the saved seq is ahead of the server: it lost data or is another server). */
  reason: string;
  /** With SINCE_TOO_OLD: the oldest seq the server can replay from. */
  oldestSeq: bigint | undefined;
  /** The OUT_OF_RANGE error. */
  error: ConnectError;
}

/**
 * Where the client is. `seq` is the saved position (undefined before the
 * first sync completes).
 *
 * - connecting: a Subscribe is on its way (attempt: reconnects so far);
 * - catching-up: replaying what happened since `seq`;
 * - live: notifications arrive as they happen (`headSeq`: the server's head when it went live);
 * - reconnecting: the stream failed; the next attempt is in `delayMs`;
 * - stopped: {@link SyncClient.stop} was called, or an error retrying cannot fix (`error`).
 */
export type SyncStatus =
  | { state: "connecting"; seq: bigint | undefined; attempt: number }
  | { state: "catching-up"; seq: bigint | undefined }
  | { state: "live"; seq: bigint | undefined; headSeq: bigint }
  | { state: "reconnecting"; seq: bigint | undefined; attempt: number; delayMs: number; error: ConnectError }
  | { state: "stopped"; seq: bigint | undefined; error?: ConnectError };

/** Options of {@link SyncClient}. */
export interface SyncClientOptions {
  /** From {@link createAgsyncTransport} (or any connect Transport). */
  transport: Transport;
  /** The sync keys to listen to: one Subscribe stream for all (the server allows 100 by default). */
  syncKeys: string[];
  /** Where the position is kept; in memory by default ({@link LocalStorageStateStore} survives reloads). */
  store?: SyncStateStore;
  /**
   * The databases to load. Default: every database the notifications of the
   * sync keys name, and at the first sync those ListDatabases lists with one
   * of the sync keys.
   */
  databases?: string[];
  /** The listener's alias (SubscribeRequest.alias); with authentication, leave empty. */
  alias?: string;
  /** Changes page size; 0 (default) is the server's (1000). */
  pageSize?: number;
  /** Reconnect delays. */
  backoff?: BackoffOptions;
  /** Timeout of each Changes and ListDatabases call, in ms. Default 30000. */
  callTimeoutMs?: number;

  /**
   * Called with each page of changed documents, in order. The position is
   * saved after it returns (or its promise resolves): if it throws, the same
   * page comes again after a reconnect, so apply pages idempotently
   * (replace documents by id).
   */
  onChanges: (batch: ChangesBatch) => void | Promise<void>;
  /** A notification that is not a document write: a Notify (with attributes), or one whose database this token may not read (sync_key and seq only). */
  onNotify?: (notification: Notification) => void | Promise<void>;
  /** A database was deleted: drop your copy. */
  onDatabaseDeleted?: (database: string, seq: bigint) => void | Promise<void>;
  /** The saved position is unusable (OUT_OF_RANGE): drop every local copy; every database is loaded again from the start (with `reset` batches). */
  onResync?: (info: ResyncInfo) => void | Promise<void>;
  /** Called before each Subscribe with the `since` it sends (undefined: live only, on the first sync or a resync). */
  onSubscribe?: (since: bigint | undefined) => void;
  /** Every change of {@link SyncClient.status}. */
  onStatus?: (status: SyncStatus) => void;
  /** Every error that ended a Subscribe session (the client retries unless the status is then "stopped"). */
  onError?: (error: ConnectError) => void;

  /** For tests: the random source of the backoff jitter. */
  random?: () => number;
  /** For tests: waits `ms` or until `signal` aborts. */
  sleep?: (ms: number, signal: AbortSignal) => Promise<void>;
}

/** Codes a retry cannot fix: the client stops and reports them. */
const FATAL = new Set<Code>([Code.Unauthenticated, Code.PermissionDenied, Code.InvalidArgument, Code.Unimplemented]);

function defaultSleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
  });
}

function toChangedDocument(change: Change): ChangedDocument {
  return {
    id: change.id,
    rev: change.rev,
    seq: change.seq,
    deleted: change.deleted,
    body: change.deleted ? undefined : (change.body ?? {}),
  };
}

function max(a: bigint | undefined, b: bigint): bigint {
  return a === undefined || b > a ? b : a;
}

/**
 * Keeps an app's copy of agsync databases up to date. Create it, call
 * {@link start}, apply the batches {@link SyncClientOptions.onChanges}
 * receives; call {@link stop} when done.
 */
export class SyncClient {
  /** The generated client on the same transport, for the other calls (Put, Get, ListDatabases, ...). */
  readonly api: Client<typeof SyncService>;
  readonly #options: SyncClientOptions;
  readonly #store: SyncStateStore;
  readonly #syncKeys: string[];
  #state: SyncState | undefined;
  #status: SyncStatus = { state: "stopped", seq: undefined };
  #abort: AbortController | undefined;
  #running: Promise<void> | undefined;

  constructor(options: SyncClientOptions) {
    if (options.syncKeys.length === 0) throw new Error("SyncClient needs at least one sync key");
    this.#options = options;
    this.#store = options.store ?? new MemoryStateStore();
    this.#syncKeys = [...new Set(options.syncKeys)].sort();
    this.api = createClient(SyncService, options.transport);
  }

  /** Where the client is now. */
  get status(): SyncStatus {
    return this.#status;
  }

  /** The position (a copy), once loaded from the store. */
  get state(): SyncState | undefined {
    return this.#state && { ...this.#state, syncKeys: [...this.#state.syncKeys], databases: { ...this.#state.databases } };
  }

  /** Starts syncing in the background; does nothing if already started. */
  start(): void {
    if (this.#running) return;
    const abort = new AbortController();
    this.#abort = abort;
    this.#setStatus({ state: "connecting", seq: this.#state?.seq, attempt: 0 });
    this.#running = this.#run(abort.signal).finally(() => {
      if (this.#abort === abort) {
        this.#abort = undefined;
        this.#running = undefined;
      }
    });
  }

  /** Stops syncing (closing the stream); resolves when the client has stopped. */
  async stop(): Promise<void> {
    this.#abort?.abort();
    await this.#running;
  }

  /** {@link putWithMerge} on this client's connection. */
  putWithMerge(
    database: string,
    doc: DocumentWrite,
    merge: MergeFunction,
    options?: PutWithMergeOptions,
  ): Promise<PutWithMergeResult> {
    return putWithMerge(this.api, database, doc, merge, options);
  }

  #setStatus(status: SyncStatus): void {
    this.#status = status;
    this.#options.onStatus?.(status);
  }

  async #save(): Promise<void> {
    if (this.#state) await this.#store.set(this.#state);
  }

  async #run(signal: AbortSignal): Promise<void> {
    const sleep = this.#options.sleep ?? defaultSleep;
    let attempt = 0;
    let lastError: ConnectError | undefined;
    try {
      const saved = await this.#store.get();
      const sameKeys = saved !== undefined && saved.syncKeys.join("\n") === this.#syncKeys.join("\n");
      // A position in other keys' events is no position in these; the
      // databases' own positions stay valid whatever the keys.
      this.#state = {
        syncKeys: this.#syncKeys,
        seq: sameKeys ? saved.seq : undefined,
        databases: { ...(saved?.databases ?? {}) },
      };
      while (!signal.aborted) {
        if (this.#status.state !== "connecting" || this.#status.seq !== this.#state.seq || this.#status.attempt !== attempt) {
          this.#setStatus({ state: "connecting", seq: this.#state.seq, attempt });
        }
        let error: ConnectError;
        try {
          await this.#session(signal, () => {
            attempt = 0;
          });
          error = new ConnectError("the Subscribe stream ended without a status", Code.Unavailable);
        } catch (err) {
          error = ConnectError.from(err);
        }
        if (signal.aborted) break;
        this.#options.onError?.(error);
        let delayMs: number;
        if (error.code === Code.OutOfRange && this.#state.seq !== undefined) {
          // Only a `since` can be out of range: without one, retry as usual.
          await this.#resync(error);
          attempt = 0;
          continue;
        } else if (FATAL.has(error.code)) {
          lastError = error;
          break;
        } else if (error.code === Code.Unavailable && errorInfoOf(error, "SHUTTING_DOWN")) {
          // The server ended the stream on shutdown, naming where to resume;
          // every event before the status was handled, so it is safe to take.
          const since = seqMetadata(errorInfoOf(error, "SHUTTING_DOWN"), "since");
          if (since !== undefined && this.#state.seq !== undefined && since > this.#state.seq) {
            this.#state.seq = since;
            await this.#save();
          }
          attempt = 0;
          delayMs = backoffDelay(0, this.#options.backoff, this.#options.random);
        } else {
          delayMs = backoffDelay(attempt, this.#options.backoff, this.#options.random);
        }
        attempt += 1;
        this.#setStatus({ state: "reconnecting", seq: this.#state.seq, attempt, delayMs, error });
        await sleep(delayMs, signal);
      }
    } catch (err) {
      // The store or an app callback outside a session failed.
      lastError = ConnectError.from(err);
      this.#options.onError?.(lastError);
    }
    this.#setStatus(
      lastError ? { state: "stopped", seq: this.#state?.seq, error: lastError } : { state: "stopped", seq: this.#state?.seq },
    );
  }

  /** One Subscribe stream, until it fails (throws) or ends. */
  async #session(signal: AbortSignal, onLive: () => void): Promise<void> {
    const state = this.#state!;
    const session = new AbortController();
    const stopSession = () => session.abort();
    signal.addEventListener("abort", stopSession, { once: true });
    try {
      this.#options.onSubscribe?.(state.seq);
      const stream = this.api.subscribe(
        {
          syncKeys: this.#syncKeys,
          alias: this.#options.alias ?? "",
          ...(state.seq !== undefined ? { since: state.seq } : {}),
        },
        { signal: session.signal },
      );
      const resuming = state.seq !== undefined;
      for await (const res of stream) {
        if (res.event.case === "notification" && resuming && this.#status.state === "connecting") {
          this.#setStatus({ state: "catching-up", seq: state.seq });
        }
        await this.#handle(res, session.signal);
        if (res.event.case === "subscribed") {
          onLive();
          this.#setStatus({ state: "live", seq: state.seq, headSeq: res.event.value.headSeq });
        } else if (this.#status.state === "live" || this.#status.state === "catching-up") {
          this.#setStatus({ ...this.#status, seq: state.seq });
        }
      }
    } finally {
      signal.removeEventListener("abort", stopSession);
      session.abort();
    }
  }

  async #handle(res: SubscribeResponse, signal: AbortSignal): Promise<void> {
    const state = this.#state!;
    switch (res.event.case) {
      case "subscribed": {
        if (state.seq === undefined) {
          // First sync (or a resync): live from head_seq on, so load every
          // database as it is now; later writes come as notifications.
          await this.#loadAll(signal);
          state.seq = res.event.value.headSeq;
          await this.#save();
        }
        return;
      }
      case "progress": {
        state.seq = max(state.seq, res.event.value.headSeq);
        await this.#save();
        return;
      }
      case "notification": {
        await this.#notification(res.event.value, signal);
        state.seq = max(state.seq, res.event.value.seq);
        await this.#save();
        return;
      }
      default:
        return;
    }
  }

  async #notification(n: Notification, signal: AbortSignal): Promise<void> {
    const state = this.#state!;
    if (n.databaseDeleted) {
      if (!this.#tracks(n.database)) return;
      delete state.databases[n.database];
      await this.#save();
      await this.#options.onDatabaseDeleted?.(n.database, n.seq);
      return;
    }
    if (n.database === "") {
      await this.#options.onNotify?.(n);
      return;
    }
    if (!this.#tracks(n.database)) return;
    // A load that ran to the end after this write already has it.
    if ((state.databases[n.database] ?? 0n) >= n.seq) return;
    await this.#load(n.database, signal);
  }

  #tracks(database: string): boolean {
    return this.#options.databases === undefined || this.#options.databases.includes(database);
  }

  async #loadAll(signal: AbortSignal): Promise<void> {
    const state = this.#state!;
    let names = this.#options.databases;
    if (names === undefined) {
      const listed = await this.api.listDatabases({}, { signal, timeoutMs: this.#options.callTimeoutMs ?? 30_000 });
      names = listed.databases.filter((db) => this.#syncKeys.includes(db.syncKey)).map((db) => db.name);
      // A database we had that is no longer listed was deleted while we
      // were away (or we lost the right to read it).
      for (const name of Object.keys(state.databases)) {
        if (!names.includes(name)) {
          delete state.databases[name];
          await this.#save();
          await this.#options.onDatabaseDeleted?.(name, 0n);
        }
      }
    }
    for (const name of names) await this.#load(name, signal);
  }

  /** Loads a database's changes from its saved position to the end of the feed. */
  async #load(database: string, signal: AbortSignal): Promise<void> {
    const state = this.#state!;
    let since = state.databases[database] ?? 0n;
    let first = true;
    for (;;) {
      let page;
      try {
        page = await this.api.changes(
          { database, since, limit: this.#options.pageSize ?? 0, includeDocs: true },
          { signal, timeoutMs: this.#options.callTimeoutMs ?? 30_000 },
        );
      } catch (err) {
        // Deleted meanwhile: its database_deleted notification follows.
        if (err instanceof ConnectError && err.code === Code.NotFound) return;
        throw err;
      }
      if (since !== 0n && since < page.databaseCreatedSeq) {
        // Our copy is of an earlier instance of this database (it was
        // deleted and created again): reload it from the start.
        since = 0n;
        first = true;
        continue;
      }
      const reset = first && since === 0n;
      first = false;
      if (page.changes.length > 0 || reset) {
        await this.#options.onChanges({
          database,
          since,
          lastSeq: page.lastSeq,
          reset,
          changes: page.changes.map(toChangedDocument),
        });
      }
      if (page.changes.length === 0) {
        if (reset) {
          state.databases[database] = since;
          await this.#save();
        }
        return;
      }
      since = page.lastSeq;
      state.databases[database] = since;
      await this.#save();
    }
  }

  async #resync(error: ConnectError): Promise<void> {
    const info = errorInfoOf(error);
    await this.#options.onResync?.({
      reason: info?.reason ?? "OUT_OF_RANGE",
      oldestSeq: seqMetadata(info, "oldest_seq"),
      error,
    });
    this.#state = { syncKeys: this.#syncKeys, seq: undefined, databases: {} };
    await this.#save();
  }
}
