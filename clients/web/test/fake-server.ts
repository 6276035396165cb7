// An in-memory agsync for unit tests: enough of SyncService (databases,
// revisions, conflicts with rich details, Changes paging, a retained event
// log, Subscribe replay/live/progress) behind connect's router transport,
// with knobs to fail streams the way the real server does.
import { create, type JsonObject } from "@bufbuild/protobuf";
import { Code, ConnectError, createRouterTransport, type Interceptor, type Transport } from "@connectrpc/connect";
import {
  DocumentSchema,
  NotificationSchema,
  SyncService,
  type ChangesRequest,
  type Notification,
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
  /** Errors the next Subscribe calls fail with, one per call, before any event. */
  readonly refuseSubscribes: ConnectError[] = [];
  /** When set, every Put conflicts as if someone wrote just before (for bounded-retry tests). */
  alwaysConflict = false;
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
                .map((db) => ({ name: db.name, syncKey: db.syncKey, createdSeq: db.createdSeq })),
            };
          },
          changes: (req, ctx) => {
            this.authorization.push(ctx.requestHeader.get("authorization") ?? "");
            this.changesRequests.push(req);
            const db = this.#db(req.database);
            const all = [...db.docs.values()].filter((d) => d.seq > req.since).sort((a, b) => Number(a.seq - b.seq));
            const page = all.slice(0, req.limit || 1000);
            return {
              changes: page.map((d) => ({
                id: d.id,
                rev: d.rev,
                seq: d.seq,
                deleted: d.deleted,
                ...(req.includeDocs && !d.deleted ? { body: d.body } : {}),
              })),
              lastSeq: page.length ? page[page.length - 1]!.seq : req.since,
              databaseCreatedSeq: db.createdSeq,
            };
          },
          put: (req) => {
            this.putRequests.push({ id: req.id, rev: req.rev, body: req.body });
            const db = this.#db(req.database);
            if (this.alwaysConflict) {
              const current = this.put(req.database, req.id, { ...(db.docs.get(req.id)?.body ?? {}), by: "someone else" });
              throw this.#conflict(db, current, req.rev);
            }
            const current = db.docs.get(req.id);
            const live = current && !current.deleted ? current : undefined;
            if ((live?.rev ?? "") !== req.rev) throw this.#conflict(db, live, req.rev);
            const doc = this.put(req.database, req.id, req.body ?? {});
            return { id: doc.id, rev: doc.rev, seq: doc.seq };
          },
          subscribe: (req, ctx) => this.#subscribe(req, ctx.requestHeader, ctx.signal),
        });
      },
      { transport: { interceptors } },
    );
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
}

/** Polls `cond` every few ms; fails with `what` after `timeoutMs`. */
export async function waitFor(cond: () => boolean, what: string, timeoutMs = 2000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}
