/**
 * SyncClient: what every app that keeps a copy of agsync databases needs.
 * One Subscribe stream for all its sync keys; on each notification, the
 * changed database's documents are loaded with Changes (paged, from where
 * the last load ended) and handed to the app; a database loaded from the
 * beginning (first sync, resync, re-created) comes in one Snapshot stream
 * instead, then Changes from the snapshot's seq; the position is saved in a
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
  type SnapshotResponse,
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

/**
 * One page of Changes of one database, or one message of a Snapshot stream
 * (see {@link SyncClientOptions.snapshot}).
 */
export interface ChangesBatch {
  database: string;
  /** The `since` the page was read from (for a snapshot message: the previous batch's `lastSeq`, 0 for the first). */
  since: bigint;
  /**
   * The highest seq in the page: the next `since`. For a snapshot message,
   * the seq of its last document, and on the snapshot's last message the
   * snapshot's seq (every change up to it is in the snapshot).
   */
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
  /**
   * Load a database from the beginning (first sync, a resync, a re-created
   * or newly seen database) with one Snapshot stream, then Changes from the
   * snapshot's seq, instead of paging Changes from 0: several times faster
   * for large databases. Default true. The batches are the same kind either
   * way (the first one `reset`); with a server that has no Snapshot
   * (UNIMPLEMENTED) the client pages Changes and does not ask again.
   */
  snapshot?: boolean;
  /** Reconnect delays. */
  backoff?: BackoffOptions;
  /**
   * Timeout of each Changes and ListDatabases call, in ms; for a Snapshot
   * stream, the longest wait for its next message. Default 30000.
   */
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

/**
 * A Change as the app gets it. The body comes as JSON text (`body_json`,
 * asked for with `json_bodies`) or, from a server that predates it, as a
 * Struct (`body`).
 */
function toChangedDocument(change: Change): ChangedDocument {
  let body: JsonObject | undefined;
  if (!change.deleted) body = change.bodyJson !== "" ? (JSON.parse(change.bodyJson) as JsonObject) : (change.body ?? {});
  return { id: change.id, rev: change.rev, seq: change.seq, deleted: change.deleted, body };
}

/** How a Snapshot load ended (see SyncClient's #snapshot). */
type SnapshotOutcome =
  /** Go on with Changes from `since`: the snapshot's seq, or the seq of the last document received before the stream broke. */
  | { kind: "loaded"; since: bigint }
  /** The server has no Snapshot: page Changes from 0. */
  | { kind: "unsupported" }
  /** The database does not exist (any more). */
  | { kind: "gone" };

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
  /** The server answered Snapshot with UNIMPLEMENTED: page Changes from now on. */
  #noSnapshot = false;

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

  /**
   * Loads a database's changes from its saved position to the end of the
   * feed. From position 0, a Snapshot stream first (unless turned off or
   * unsupported), then Changes from where it ended.
   */
  async #load(database: string, signal: AbortSignal): Promise<void> {
    const state = this.#state!;
    let since = state.databases[database] ?? 0n;
    let first = true;
    for (;;) {
      if (first && since === 0n && this.#options.snapshot !== false && !this.#noSnapshot) {
        const outcome = await this.#snapshot(database, signal);
        if (outcome.kind === "gone") return;
        if (outcome.kind === "loaded") {
          // The reset batch went out: what follows is pages after it.
          since = outcome.since;
          first = false;
        }
      }
      let page;
      try {
        page = await this.api.changes(
          { database, since, limit: this.#options.pageSize ?? 0, includeDocs: true, jsonBodies: true },
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

  /**
   * Loads a database from the beginning with one Snapshot stream (bodies as
   * JSON): each message goes to onChanges as a batch (the first with
   * `reset`, even when the database is empty), and the position saved after
   * it is the seq of its last document, a valid Changes position; once the
   * last message (`complete`) is handled, the snapshot's seq. If the stream
   * breaks after documents arrived, they are kept and the caller goes on
   * with Changes from the last one. A failure before any document arrived
   * is thrown (the session retries later), except UNIMPLEMENTED (no
   * Snapshot on this server) and NOT_FOUND (no such database).
   */
  async #snapshot(database: string, signal: AbortSignal): Promise<SnapshotOutcome> {
    const state = this.#state!;
    const idleMs = this.#options.callTimeoutMs ?? 30_000;
    const call = new AbortController();
    const stopCall = () => call.abort();
    signal.addEventListener("abort", stopCall, { once: true });
    // The position the next batch starts from: 0, then the seq of the last
    // document handed to the app (saved), then the snapshot's seq.
    let since = 0n;
    let delivered = false;
    try {
      const messages = this.api.snapshot({ database, jsonBodies: true }, { signal: call.signal })[Symbol.asyncIterator]();
      for (;;) {
        let next: IteratorResult<SnapshotResponse>;
        // A stream may last long, so no deadline on the whole call: a
        // limit on each wait for the next message instead.
        const timer = setTimeout(
          () => call.abort(new ConnectError(`no Snapshot message for ${idleMs} ms`, Code.DeadlineExceeded)),
          idleMs,
        );
        try {
          next = await messages.next();
        } catch (err) {
          if (signal.aborted) throw err;
          const error = ConnectError.from(err);
          if (error.code === Code.NotFound) return { kind: "gone" }; // its database_deleted notification follows
          if (!delivered) {
            if (error.code === Code.Unimplemented) {
              this.#noSnapshot = true;
              return { kind: "unsupported" };
            }
            throw error;
          }
          if (FATAL.has(error.code) && error.code !== Code.Unimplemented) throw error;
          // A broken stream: keep what arrived, load the rest with Changes.
          return { kind: "loaded", since };
        } finally {
          clearTimeout(timer);
        }
        if (next.done) {
          if (!delivered) throw new ConnectError("the Snapshot stream ended before its last message", Code.Unavailable);
          return { kind: "loaded", since };
        }
        const message = next.value;
        const last = message.changes[message.changes.length - 1];
        const lastSeq = message.complete ? message.snapshotSeq : (last?.seq ?? since);
        if (message.changes.length > 0 || (message.complete && !delivered)) {
          await this.#options.onChanges({
            database,
            since,
            lastSeq,
            reset: !delivered,
            changes: message.changes.map(toChangedDocument),
          });
          delivered = true;
        }
        since = lastSeq;
        state.databases[database] = since;
        await this.#save();
        if (message.complete) {
          // Read the stream's end (its status), so the call closes cleanly
          // (over HTTP/1.1, a connection given up mid-response is not reused).
          const timer = setTimeout(() => call.abort(), idleMs);
          await messages.next().catch(() => undefined).finally(() => clearTimeout(timer));
          return { kind: "loaded", since };
        }
      }
    } finally {
      signal.removeEventListener("abort", stopCall);
      call.abort(); // ends the stream if we stopped reading early
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
