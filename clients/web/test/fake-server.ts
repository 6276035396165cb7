// An in-memory agsync for unit tests: enough of SyncService (databases,
// revisions, conflicts with rich details, Changes paging with Struct or JSON
// bodies, Snapshot streams, a retained event log, Subscribe
// replay/live/progress) behind connect's router transport, with knobs to
// fail streams the way the real server does.
import { create, toBinary, type JsonObject, type JsonValue } from "@bufbuild/protobuf";
import { Code, ConnectError, createRouterTransport, type Interceptor, type Transport } from "@connectrpc/connect";
import {
  ChangeSchema,
  DocumentSchema,
  NotificationSchema,
  SyncService,
  type Change,
  type ChangesRequest,
  type Notification,
  type SnapshotRequest,
  type SnapshotResponse,
  type SubscribeRequest,
  type SubscribeResponse,
} from "../src/gen/agsync/v1/sync_pb.js";
import { ErrorInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";

interface StoredDoc {
  id: string;
  rev: string;
  seq: bigint;
  deleted: boolean;
  body: JsonObject;
}

interface Db {
  name: string;
  syncKey: string;
  createdSeq: bigint;
  docs: Map<string, StoredDoc>;
}

/** An async queue a stream handler reads from. */
class Channel<T> implements AsyncIterable<T> {
  #items: T[] = [];
  #waiting: ((r: IteratorResult<T>) => void) | undefined;
  #error: unknown;
  #failed = false;

  push(item: T): void {
    if (this.#failed) return;
    if (this.#waiting) {
      const resolve = this.#waiting;
      this.#waiting = undefined;
      resolve({ value: item, done: false });
    } else this.#items.push(item);
  }

  fail(error: unknown): void {
    this.#failed = true;
    this.#error = error;
    this.#waiting?.({ value: undefined, done: true });
    this.#waiting = undefined;
  }

  [Symbol.asyncIterator](): AsyncIterator<T> {
    return {
      next: async () => {
        const item = this.#items.shift();
        if (item !== undefined) return { value: item, done: false };
        if (this.#failed) throw this.#error;
        const r = await new Promise<IteratorResult<T>>((resolve) => (this.#waiting = resolve));
        if (this.#failed) throw this.#error;
        return r;
      },
    };
  }
}

/** JSON text with object keys sorted, as the server's body_json. */
export function canonicalJson(value: JsonValue): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(value[k]!)}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

/** A document as a Change of a response: its body as JSON text (json_bodies) or as a Struct, when asked for. */
function wireChange(d: StoredDoc, includeDocs: boolean, jsonBodies: boolean): Change {
  const body = !includeDocs || d.deleted ? {} : jsonBodies ? { bodyJson: canonicalJson(d.body) } : { body: d.body };
  return create(ChangeSchema, { id: d.id, rev: d.rev, seq: d.seq, deleted: d.deleted, ...body });
}

/** An ErrorInfo detail of domain agsync. */
export function agsyncError(code: Code, message: string, reason: string, metadata: Record<string, string>): ConnectError {
  return new ConnectError(message, code, undefined, [
    { desc: ErrorInfoSchema, value: { reason, domain: "agsync", metadata } },
  ]);
}

export class FakeServer {
  seq = 0n;
  /** The oldest seq Subscribe can replay from (the log before it is pruned). */
  oldestSeq = 0n;
  readonly dbs = new Map<string, Db>();
  readonly log: Notification[] = [];
  readonly subscribeRequests: SubscribeRequest[] = [];
  readonly changesRequests: ChangesRequest[] = [];
  readonly putRequests: { id: string; rev: string; body: JsonObject | undefined }[] = [];
  readonly authorization: string[] = [];
  readonly snapshotRequests: SnapshotRequest[] = [];
  /** False: Snapshot fails with UNIMPLEMENTED, as on a server that predates it. */
  snapshotSupported = true;
  /** Whether Changes honours json_bodies (false: a server that predates it sends Struct bodies). */
  jsonBodies = true;
  /** The budget of one Snapshot message's changes, in encoded bytes (the real server's is about 1 MiB). */
  snapshotMessageBytes = 1024 * 1024;
  /** Send the Snapshot's last message (complete) without changes, which the contract allows, instead of with the last ones. */
  snapshotEmptyLast = false;
  /** The next Snapshot streams end with `error` after `afterMessages` messages (0: before the first), one entry per stream. */
  readonly breakSnapshots: { afterMessages: number; error: ConnectError }[] = [];
  /**
   * Called before each Snapshot message is sent (index 0: after the
   * snapshot's seq is fixed, before the first one): writes done here happen
   * while the snapshot is open; a promise delays the message.
   */
  beforeSnapshotMessage: ((index: number) => void | Promise<void>) | undefined;
  /** Snapshot streams whose handler has not ended yet. */
  openSnapshots = 0;
  /** Errors the next Subscribe calls fail with, one per call, before any event. */
  readonly refuseSubscribes: ConnectError[] = [];
  /** When set, every Put conflicts as if someone wrote just before (for bounded-retry tests). */
  alwaysConflict = false;
  /** Whether request_id deduplication is on (AIP-155), as in the real server. */
  dedup = true;
  /** The next N writes (Put, Delete, BulkPut) fail with UNAVAILABLE before doing anything. */
  failWrites = 0;
  /** The next N writes are executed, then their response is lost (UNAVAILABLE): a retry must not write twice. */
  loseResponses = 0;
  /** Every write call, in order: method, request_id and whether it was answered from the dedup record. */
  readonly writeCalls: { method: string; requestId: string; replayed: boolean; items: number }[] = [];
  /** Per database, request_id -> the request's fingerprint and first response. */
  readonly #requestIds = new Map<string, Map<string, { fingerprint: string; response: unknown }>>();
  #streams = new Set<{ keys: string[]; channel: Channel<SubscribeResponse> }>();

  transport(interceptors: Interceptor[] = []): Transport {
    return createRouterTransport(
      (router) => {
        router.service(SyncService, {
          listDatabases: (_req, ctx) => {
            this.authorization.push(ctx.requestHeader.get("authorization") ?? "");
            return {
              databases: [...this.dbs.values()]
                .sort((a, b) => a.name.localeCompare(b.name))
                .map((db) => ({
                  name: db.name,
                  syncKey: db.syncKey,
                  createdSeq: db.createdSeq,
                  updateSeq: [...db.docs.values()].reduce((max, d) => (d.seq > max ? d.seq : max), 0n),
                })),
            };
          },
          changes: (req, ctx) => {
            this.authorization.push(ctx.requestHeader.get("authorization") ?? "");
            this.changesRequests.push(req);
            const db = this.#db(req.database);
            const all = [...db.docs.values()].filter((d) => d.seq > req.since).sort((a, b) => Number(a.seq - b.seq));
            const page = all.slice(0, req.limit || 1000);
            return {
              changes: page.map((d) => wireChange(d, req.includeDocs, req.jsonBodies && this.jsonBodies)),
              lastSeq: page.length ? page[page.length - 1]!.seq : req.since,
              databaseCreatedSeq: db.createdSeq,
            };
          },
          put: (req) =>
            this.#write("put", req.database, req.requestId, { id: req.id, rev: req.rev, body: req.body ?? null, aliases: req.notifyAliases }, 1, () =>
              this.#put(req.database, req.id, req.rev, req.body),
            ),
          delete: (req) =>
            this.#write("delete", req.database, req.requestId, { id: req.id, rev: req.rev, aliases: req.notifyAliases }, 1, () => {
              const db = this.#db(req.database);
              const current = db.docs.get(req.id);
              if (!current || current.deleted) {
                throw new ConnectError(`document "${req.id}" does not exist in database "${req.database}" (it is missing or deleted)`, Code.NotFound);
              }
              if (current.rev !== req.rev) throw this.#conflict(db, current, req.rev);
              const doc = this.remove(req.database, req.id);
              return { id: doc.id, rev: doc.rev, seq: doc.seq };
            }),
          bulkPut: (req) =>
            this.#write(
              "bulkPut",
              req.database,
              req.requestId,
              req.docs.map((d) => ({ id: d.id, rev: d.rev, body: d.body ?? null, aliases: d.notifyAliases })),
              req.docs.length,
              () => {
                this.#db(req.database);
                return {
                  results: req.docs.map((d) => {
                    const id = d.id || `gen${++this.#generatedIds}`;
                    if (d.body === undefined) return { id, rev: "", seq: 0n, error: "invalid", reason: "body is required" };
                    if (Object.keys(d.body).some((k) => k.startsWith("_"))) {
                      return { id, rev: "", seq: 0n, error: "invalid", reason: "top-level keys starting with _ are reserved" };
                    }
                    if (JSON.stringify(d.body).length > this.maxDocBytes) {
                      return { id, rev: "", seq: 0n, error: "too_large", reason: "the body is over the document size limit" };
                    }
                    try {
                      const r = this.#put(req.database, id, d.rev, d.body);
                      return { ...r, error: "", reason: "" };
                    } catch (err) {
                      if (err instanceof ConnectError && err.code === Code.Aborted) return { id, rev: "", seq: 0n, error: "conflict", reason: err.rawMessage };
                      throw err;
                    }
                  }),
                };
              },
            ),
          get: (req) => {
            const db = this.#db(req.database);
            const doc = db.docs.get(req.id);
            if (!doc || doc.deleted) {
              throw new ConnectError(`document "${req.id}" does not exist in database "${req.database}" (it is missing or deleted)`, Code.NotFound);
            }
            return { document: { id: doc.id, rev: doc.rev, body: doc.body, seq: doc.seq } };
          },
          subscribe: (req, ctx) => this.#subscribe(req, ctx.requestHeader, ctx.signal),
          snapshot: (req, ctx) => this.#snapshot(req, ctx.requestHeader, ctx.signal),
        });
      },
      { transport: { interceptors } },
    );
  }

  #generatedIds = 0;
  /** The document size limit of BulkPut items (too_large above). */
  maxDocBytes = 64 * 1024;

  /** A write call with the real server's request_id rules and the failure knobs. */
  #write<T>(method: string, database: string, requestId: string, request: unknown, items: number, run: () => T): T {
    if (this.failWrites > 0) {
      this.failWrites -= 1;
      throw new ConnectError("the server is busy (fake)", Code.Unavailable);
    }
    let seen = this.#requestIds.get(database);
    if (!seen) this.#requestIds.set(database, (seen = new Map()));
    const fingerprint = JSON.stringify({ method, request });
    if (requestId !== "" && this.dedup) {
      const first = seen.get(requestId);
      if (first) {
        if (first.fingerprint !== fingerprint) {
          throw agsyncError(Code.InvalidArgument, `request_id ${requestId} was used for another request`, "REQUEST_ID_REUSED", { request_id: requestId });
        }
        this.writeCalls.push({ method, requestId, replayed: true, items });
        return this.#deliver(first.response as T);
      }
    }
    const response = run(); // throws (and records nothing) on failure
    this.writeCalls.push({ method, requestId, replayed: false, items });
    if (requestId !== "" && this.dedup) seen.set(requestId, { fingerprint, response });
    return this.#deliver(response);
  }

  #deliver<T>(response: T): T {
    if (this.loseResponses > 0) {
      this.loseResponses -= 1;
      throw new ConnectError("the connection was lost (fake)", Code.Unavailable);
    }
    return response;
  }

  #put(database: string, id: string, rev: string, body: JsonObject | undefined): { id: string; rev: string; seq: bigint } {
    this.putRequests.push({ id, rev, body });
    const db = this.#db(database);
    if (this.alwaysConflict) {
      const current = this.put(database, id, { ...(db.docs.get(id)?.body ?? {}), by: "someone else" });
      throw this.#conflict(db, current, rev);
    }
    const current = db.docs.get(id);
    const live = current && !current.deleted ? current : undefined;
    if ((live?.rev ?? "") !== rev) throw this.#conflict(db, live, rev);
    const doc = this.put(database, id, body ?? {});
    return { id: doc.id, rev: doc.rev, seq: doc.seq };
  }

  #db(name: string): Db {
    const db = this.dbs.get(name);
    if (!db) throw new ConnectError(`database "${name}" does not exist`, Code.NotFound);
    return db;
  }

  #conflict(db: Db, current: StoredDoc | undefined, sent: string): ConnectError {
    const details: ConstructorParameters<typeof ConnectError>[3] = [
      {
        desc: ErrorInfoSchema,
        value: {
          reason: "CONFLICT",
          domain: "agsync",
          metadata: { database: db.name, id: current?.id ?? "", current_rev: current?.rev ?? "" },
        },
      },
    ];
    if (current) details.push({ desc: DocumentSchema, value: { id: current.id, rev: current.rev, body: current.body, seq: current.seq } });
    return new ConnectError(`Document update conflict: the request sent rev ${sent}`, Code.Aborted, undefined, details);
  }

  createDatabase(name: string, syncKey = name): void {
    this.dbs.set(name, { name, syncKey, createdSeq: this.seq, docs: new Map() });
  }

  deleteDatabase(name: string): void {
    const db = this.#db(name);
    this.dbs.delete(name);
    this.#requestIds.delete(name);
    this.#publish(create(NotificationSchema, { syncKey: db.syncKey, seq: ++this.seq, database: name, deleted: true, databaseDeleted: true }));
  }

  /** Writes a document directly (as another client would), publishing its notification. */
  put(database: string, id: string, body: JsonObject): StoredDoc {
    const db = this.#db(database);
    const previous = db.docs.get(id);
    const generation = previous ? Number(previous.rev.split("-")[0]) + 1 : 1;
    const doc: StoredDoc = { id, rev: `${generation}-${"0".repeat(31)}${generation % 10}`, seq: ++this.seq, deleted: false, body };
    db.docs.set(id, doc);
    this.#publish(create(NotificationSchema, { syncKey: db.syncKey, seq: doc.seq, database, id, rev: doc.rev }));
    return doc;
  }

  /** Records a request_id as if a request with another content had used it (to provoke REQUEST_ID_REUSED). */
  poisonRequestId(database: string, requestId: string): void {
    let seen = this.#requestIds.get(database);
    if (!seen) this.#requestIds.set(database, (seen = new Map()));
    seen.set(requestId, { fingerprint: "another request", response: undefined });
  }

  /** Deletes a document directly (as another client would), leaving a tombstone. */
  remove(database: string, id: string): StoredDoc {
    const db = this.#db(database);
    const previous = db.docs.get(id);
    if (!previous || previous.deleted) throw new Error(`fake: ${id} is not live`);
    const generation = Number(previous.rev.split("-")[0]) + 1;
    const doc: StoredDoc = { id, rev: `${generation}-${"0".repeat(31)}${generation % 10}`, seq: ++this.seq, deleted: true, body: {} };
    db.docs.set(id, doc);
    this.#publish(create(NotificationSchema, { syncKey: db.syncKey, seq: doc.seq, database, id, rev: doc.rev, deleted: true }));
    return doc;
  }

  /** The live document, if any. */
  doc(database: string, id: string): StoredDoc | undefined {
    const doc = this.dbs.get(database)?.docs.get(id);
    return doc && !doc.deleted ? doc : undefined;
  }

  /** An app's Notify. */
  notify(syncKey: string, attributes: Record<string, string>): bigint {
    this.#publish(create(NotificationSchema, { syncKey, seq: ++this.seq, attributes }));
    return this.seq;
  }

  #publish(n: Notification): void {
    this.log.push(n);
    for (const s of this.#streams) {
      if (s.keys.includes(n.syncKey)) s.channel.push({ event: { case: "notification", value: n } } as SubscribeResponse);
    }
  }

  /** Sends a progress event to every open stream. */
  progress(): void {
    for (const s of this.#streams) s.channel.push({ event: { case: "progress", value: { headSeq: this.seq } } } as SubscribeResponse);
  }

  /** Ends every open stream with this error. */
  failStreams(error: ConnectError): void {
    for (const s of this.#streams) s.channel.fail(error);
  }

  get openStreams(): number {
    return this.#streams.size;
  }

  async *#subscribe(req: SubscribeRequest, headers: Headers, signal: AbortSignal): AsyncGenerator<SubscribeResponse> {
    this.subscribeRequests.push(req);
    this.authorization.push(headers.get("authorization") ?? "");
    const refusal = this.refuseSubscribes.shift();
    if (refusal) throw refusal;
    if (req.since !== undefined && req.since < this.oldestSeq) {
      throw agsyncError(Code.OutOfRange, `since ${req.since} is older than the log`, "SINCE_TOO_OLD", {
        oldest_seq: this.oldestSeq.toString(),
      });
    }
    const stream = { keys: req.syncKeys, channel: new Channel<SubscribeResponse>() };
    this.#streams.add(stream);
    const replay = [...this.log];
    const onAbort = () => stream.channel.fail(new ConnectError("cancelled", Code.Canceled));
    signal.addEventListener("abort", onAbort);
    try {
      if (req.since !== undefined) {
        for (const n of replay) {
          if (n.seq > req.since! && req.syncKeys.includes(n.syncKey)) yield { event: { case: "notification", value: n } } as SubscribeResponse;
        }
      }
      yield { event: { case: "subscribed", value: { headSeq: this.seq } } } as SubscribeResponse;
      yield* stream.channel;
    } finally {
      signal.removeEventListener("abort", onAbort);
      this.#streams.delete(stream);
    }
  }

  /**
   * The Snapshot RPC as the real server streams it: the documents live at
   * the seq it starts at (writes after it do not show), in seq order, in
   * messages of at most snapshotMessageBytes of changes (at least one
   * change each), the last one complete (with the last changes, or empty
   * for an empty database or with snapshotEmptyLast).
   */
  async *#snapshot(req: SnapshotRequest, headers: Headers, signal: AbortSignal): AsyncGenerator<SnapshotResponse> {
    this.snapshotRequests.push(req);
    this.authorization.push(headers.get("authorization") ?? "");
    if (!this.snapshotSupported) throw new ConnectError("Method not found: agsync.v1.SyncService/Snapshot", Code.Unimplemented);
    const db = this.#db(req.database);
    // Stored documents are replaced, never changed, by writes: this list is the database as of snapshotSeq.
    const snapshotSeq = this.seq;
    const live = [...db.docs.values()].filter((d) => !d.deleted).sort((a, b) => Number(a.seq - b.seq));
    const breaking = this.breakSnapshots.shift();
    const messages: Change[][] = [];
    let current: Change[] = [];
    let bytes = 0;
    for (const d of live) {
      const change = wireChange(d, true, req.jsonBodies);
      const size = toBinary(ChangeSchema, change).length + 4;
      if (current.length > 0 && bytes + size > this.snapshotMessageBytes) {
        messages.push(current);
        current = [];
        bytes = 0;
      }
      current.push(change);
      bytes += size;
    }
    if (this.snapshotEmptyLast && current.length > 0) messages.push(current, []);
    else messages.push(current);
    // Open until the handler ends or the client goes away (a generator
    // waiting at a yield is not resumed then).
    let open = true;
    const close = () => {
      if (open) this.openSnapshots -= 1;
      open = false;
    };
    this.openSnapshots += 1;
    signal.addEventListener("abort", close, { once: true });
    try {
      for (const [index, changes] of messages.entries()) {
        if (breaking && breaking.afterMessages === index) throw breaking.error;
        await this.beforeSnapshotMessage?.(index);
        if (signal.aborted) return;
        yield { changes, snapshotSeq, databaseCreatedSeq: db.createdSeq, complete: index === messages.length - 1 } as SnapshotResponse;
      }
    } finally {
      signal.removeEventListener("abort", close);
      close();
    }
  }
}

/** Polls `cond` every few ms; fails with `what` after `timeoutMs`. */
export async function waitFor(cond: () => boolean, what: string, timeoutMs = 2000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}
