/**
 * The uploader: the outbox's state machine. It sends the outbox in order,
 * one batch at a time (a BulkPut of puts of one database, or one Delete),
 * and settles each answer in one local transaction.
 *
 * Exactly once: a batch (its items and its request_id) is saved before it
 * is sent, and sent again exactly as saved until an answer comes, so the
 * server's request_id deduplication (AIP-155) answers a retry with the
 * first response instead of writing twice. A conflict goes to the resolver
 * (three-way merge); its result replaces the edit under the same outbox
 * position with a new request_id. A failure that retrying cannot fix is
 * handed to the app (`onRejected`): it keeps or drops the edit, and the
 * other documents go on. Runs only in the leader tab; it never reads the
 * Subscribe stream (the replica applies pulled changes).
 *
 * @module
 */
import type { JsonObject } from "@bufbuild/protobuf";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { backoffDelay, type BackoffOptions } from "./backoff.js";
import { sleepUnless, uuid, WOKEN, type Clock } from "./clock.js";
import { conflictOf, errorInfoOf } from "./errors.js";
import type { SyncService } from "./gen/agsync/v1/sync_pb.js";
import type { LocalState } from "./local.js";
import { jsonEqual, mergeJson, type Resolution, type Resolver, type WriteConflict } from "./resolve.js";
import { docKey, META_INFLIGHT, type OutboxRow, type StorageTx } from "./storage.js";

/** A local edit the server refused for good, or a resolver rejected. */
export interface Rejection {
  requestId: string;
  database: string;
  id: string;
  op: "put" | "delete";
  /** The rejected body (a put's); undefined for a delete. */
  body: JsonObject | undefined;
  /** The body the edit started from. */
  base: JsonObject | undefined;
  /**
   * Why: "conflict" (the resolver kept the server's version), "invalid" or
   * "too_large" (BulkPut's per-document errors), "database-not-found",
   * "database-deleted", "permission-denied", "invalid-argument", or
   * "request-id-reused" (a bug: the same request_id was sent with another
   * request).
   */
  reason: string;
  /** What the server or the resolver said. */
  message: string;
  /** The server's current body, when known (conflicts). */
  remote?: JsonObject | undefined;
}

/** What the app does with a rejected edit: drop it, or keep it (not sent again until `retryFailed()`). */
export type RejectionDecision = "drop" | "keep";

/** How an outbox entry ended (each entry ends exactly once). */
export type WriteOutcome =
  | { kind: "applied"; requestId: string; database: string; id: string; rev: string; seq: bigint; deleted: boolean }
  | {
      kind: "merged";
      requestId: string;
      database: string;
      id: string;
      resolution: Resolution;
      /** The request id of the entry that now carries the merged result; undefined when the server already had it (nothing more to write). */
      replacedBy: string | undefined;
    }
  | { kind: "rejected"; requestId: string; database: string; id: string; reason: string; message: string; kept: boolean };

/** The uploader's state, for the replica's status. */
export type UploaderState =
  | { state: "idle" }
  | { state: "uploading" }
  | { state: "retrying"; attempt: number; delayMs: number; error: ConnectError }
  | { state: "stopped" };

/** A batch as saved before it is sent: sent again exactly like this until answered. */
export interface InflightBatch {
  requestId: string;
  database: string;
  kind: "bulk" | "delete";
  items: { key: string; requestId: string; id: string; rev: string; body: JsonObject | null }[];
}

/** The calls the uploader makes. */
export type UploadApi = Pick<Client<typeof SyncService>, "bulkPut" | "delete" | "get">;

/** Options of {@link Uploader}. */
export interface UploaderOptions {
  api: UploadApi;
  local: LocalState;
  resolve: Resolver;
  onRejected?: ((rejection: Rejection) => RejectionDecision | void | Promise<RejectionDecision | void>) | undefined;
  onOutcome?: ((outcome: WriteOutcome) => void) | undefined;
  onState?: ((state: UploaderState) => void) | undefined;
  /** Every failed call (the replica shows the last one). */
  onError?: ((error: Error) => void) | undefined;
  /** Asks the token provider again after UNAUTHENTICATED. */
  refreshToken?: (() => Promise<void>) | undefined;
  clock: Clock;
  backoff?: BackoffOptions | undefined;
  random?: (() => number) | undefined;
  /** Most documents per BulkPut. Default 1000. */
  maxBatch?: number | undefined;
  /** Most bytes (of JSON bodies) per BulkPut, roughly. Default 1 MiB. */
  maxBatchBytes?: number | undefined;
  /** Timeout of each call, ms. Default 30000. */
  callTimeoutMs?: number | undefined;
}

/** Codes that retrying the same request cannot change: the batch's edits are rejected. */
const PERMANENT = new Set<Code>([
  Code.NotFound,
  Code.PermissionDenied,
  Code.InvalidArgument,
  Code.FailedPrecondition,
  Code.Unimplemented,
  Code.OutOfRange,
  Code.AlreadyExists,
]);

/** The reason a call-level error gives its edits. */
export function rejectionReason(error: ConnectError): string {
  if (errorInfoOf(error, "REQUEST_ID_REUSED")) return "request-id-reused";
  switch (error.code) {
    case Code.NotFound:
      return "database-not-found";
    case Code.PermissionDenied:
      return "permission-denied";
    case Code.InvalidArgument:
      return "invalid-argument";
    default:
      return Code[error.code]?.toLowerCase() ?? "error";
  }
}

/** NOT_FOUND for the database (rather than the document). */
function databaseMissing(error: ConnectError): boolean {
  return error.code === Code.NotFound && /^database /.test(error.rawMessage);
}

/** A known server document: what a conflict's details, a Get or a write told us. */
export interface Remote {
  rev: string;
  seq: bigint;
  body: JsonObject;
}

/**
 * After `done` (an entry of a document) is applied or dropped, the next
 * pending edit of that document (queued while `done` was pending, so its
 * base rev is unknown) is based on what the server has now: its base rev
 * becomes `rev`, and its changes are laid over `body` (the edit's own
 * changes relative to what it started from, as the replica showed it).
 */
export async function rebaseNext(
  tx: StorageTx,
  done: OutboxRow,
  rev: string,
  body: JsonObject | undefined,
  rows?: OutboxRow[],
): Promise<void> {
  const next = (rows ?? (await tx.outboxOf(done.database, done.id))).find((row) => row.key > done.key);
  if (!next || next.baseRev !== null) return;
  if (body === undefined) {
    await tx.putOutbox({ ...next, baseRev: "", baseBody: null });
    return;
  }
  const rebased = next.op === "put" ? (mergeJson(next.baseBody ?? {}, next.body!, body, "local") as JsonObject) : null;
  await tx.putOutbox({ ...next, baseRev: rev, baseBody: body, body: rebased });
}

/** Why an edit is rejected, and the server's state if the rejection learnt it. */
export interface RejectInfo {
  reason: string;
  message: string;
  /** The server's current document (with remoteKnown: undefined means deleted or missing). */
  remote?: Remote | undefined;
  /** Whether `remote` is the server's state (a conflict), rather than unknown. */
  remoteKnown?: boolean;
}

/** Sends the outbox. Create, {@link start}; {@link wake} when the outbox grows or the network is back; {@link stop}. */
export class Uploader {
  readonly #o: UploaderOptions;
  readonly #local: LocalState;
  #abort: AbortController | undefined;
  #running: Promise<void> | undefined;
  #wake: AbortController = new AbortController();
  #kicked = false;
  #state: UploaderState = { state: "stopped" };
  /** Set after a RESOURCE_EXHAUSTED: smaller batches for a while. */
  #maxBatch: number;

  constructor(options: UploaderOptions) {
    this.#o = options;
    this.#local = options.local;
    this.#maxBatch = options.maxBatch ?? 1000;
  }

  get state(): UploaderState {
    return this.#state;
  }

  start(): void {
    if (this.#running) return;
    const abort = new AbortController();
    this.#abort = abort;
    this.#running = this.#run(abort.signal).finally(() => {
      this.#running = undefined;
      this.#setState({ state: "stopped" });
    });
  }

  async stop(): Promise<void> {
    this.#abort?.abort();
    await this.#running;
  }

  /** An edit was queued: look at the outbox now, unless waiting out a backoff delay (the server is not reachable: a new edit does not change that). */
  wake(): void {
    if (this.#state.state === "retrying") return;
    this.retryNow();
  }

  /** The network is back, or the app asks: look again now, skipping any backoff delay. */
  retryNow(): void {
    this.#kicked = true;
    this.#wake.abort(WOKEN);
  }

  #setState(state: UploaderState): void {
    if (state.state === this.#state.state && state.state !== "retrying") return;
    this.#state = state;
    this.#o.onState?.(state);
  }

  /** Waits up to `ms` (forever if undefined) or until woken; returns at once if woken meanwhile. */
  async #pause(ms: number | undefined, signal: AbortSignal): Promise<void> {
    if (this.#kicked) {
      this.#kicked = false;
      return;
    }
    if (this.#wake.signal.aborted) this.#wake = new AbortController();
    const wake = this.#wake.signal;
    if (ms === undefined) {
      await new Promise<void>((resolve) => {
        const done = () => {
          wake.removeEventListener("abort", done);
          signal.removeEventListener("abort", done);
          resolve();
        };
        if (wake.aborted || signal.aborted) return resolve();
        wake.addEventListener("abort", done, { once: true });
        signal.addEventListener("abort", done, { once: true });
      });
    } else {
      await sleepUnless(this.#o.clock, ms, signal, wake);
    }
    this.#kicked = false;
  }

  async #run(signal: AbortSignal): Promise<void> {
    let attempt = 0;
    let refreshed = false;
    while (!signal.aborted) {
      let batch: InflightBatch | undefined;
      try {
        batch = this.#saved() ?? (await this.#next());
        if (!batch) {
          this.#setState({ state: "idle" });
          await this.#pause(undefined, signal);
          continue;
        }
        this.#setState({ state: "uploading" });
        await this.#send(batch, signal);
        attempt = 0;
        refreshed = false;
      } catch (err) {
        if (signal.aborted) break;
        const error = err instanceof ConnectError ? err : err instanceof Error && err.name === "ReplicaStorageError" ? err : ConnectError.from(err);
        this.#o.onError?.(error);
        if (error instanceof ConnectError) {
          if (error.code === Code.Unauthenticated && this.#o.refreshToken && !refreshed) {
            refreshed = true;
            try {
              await this.#o.refreshToken();
              continue;
            } catch (refreshError) {
              this.#o.onError?.(refreshError instanceof Error ? refreshError : new Error(String(refreshError)));
            }
          } else if (PERMANENT.has(error.code) && batch) {
            await this.#rejectBatch(batch, error).catch((e: unknown) => this.#o.onError?.(e instanceof Error ? e : new Error(String(e))));
            continue;
          } else if (error.code === Code.ResourceExhausted && batch && batch.items.length > 1) {
            // The request is over the server's size limit: it was refused
            // before anything was written, so it may be replaced by smaller
            // batches (from now on).
            this.#maxBatch = Math.max(1, Math.floor(batch.items.length / 2));
            await this.#local
              .transaction("cannot drop an oversized batch", async (tx) => tx.setMeta(META_INFLIGHT, undefined))
              .catch(() => undefined);
          }
        }
        const delayMs = backoffDelay(attempt, this.#o.backoff, this.#o.random);
        attempt += 1;
        this.#setState({ state: "retrying", attempt, delayMs, error: ConnectError.from(error) });
        await this.#pause(delayMs, signal);
      }
    }
  }

  /** The batch saved before a crash, reload or failed send: it goes again exactly as it was. */
  #saved(): InflightBatch | undefined {
    const text = this.#local.meta(META_INFLIGHT);
    if (text === undefined) return undefined;
    try {
      return JSON.parse(text) as InflightBatch;
    } catch {
      return undefined;
    }
  }

  /** The rev an entry is sent with: its base, or (queued behind an edit of the same document that another tab settled) the server's now. */
  #revFor(row: OutboxRow): string {
    if (row.baseRev !== null) return row.baseRev;
    const doc = this.#local.doc(row.database, row.id);
    return doc && !doc.deleted ? doc.rev : "";
  }

  /** Picks the next batch from the outbox (the first pending edit of each document, in order) and saves it. */
  async #next(): Promise<InflightBatch | undefined> {
    const maxBytes = this.#o.maxBatchBytes ?? 1 << 20;
    const seen = new Set<string>();
    let batch: InflightBatch | undefined;
    let bytes = 0;
    for (const row of this.#local.outbox()) {
      const key = docKey(row.database, row.id);
      if (seen.has(key)) continue;
      seen.add(key);
      if (row.failed) continue;
      const item = { key: row.key, requestId: row.requestId, id: row.id, rev: this.#revFor(row), body: row.body };
      if (!batch) {
        if (row.op === "delete") {
          batch = { requestId: row.requestId, database: row.database, kind: "delete", items: [item] };
          break;
        }
        batch = { requestId: uuid(), database: row.database, kind: "bulk", items: [] };
      } else if (row.database !== batch.database) {
        continue;
      } else if (row.op === "delete") {
        break;
      }
      const size = JSON.stringify(row.body).length + row.id.length + 64;
      if (batch.items.length > 0 && (batch.items.length >= this.#maxBatch || bytes + size > maxBytes)) break;
      batch.items.push(item);
      bytes += size;
    }
    if (!batch) return undefined;
    const saved = batch;
    await this.#local.transaction("cannot save the batch to upload", async (tx) => tx.setMeta(META_INFLIGHT, JSON.stringify(saved)));
    return saved;
  }

  async #send(batch: InflightBatch, signal: AbortSignal): Promise<void> {
    const timeoutMs = this.#o.callTimeoutMs ?? 30_000;
    if (batch.kind === "delete") {
      const item = batch.items[0]!;
      let remote: Remote | undefined;
      if (item.rev === "") {
        // Nothing of it on the server as far as we know: see what is there.
        remote = await this.#fetch(batch.database, item.id, signal);
      } else {
        try {
          const res = await this.#o.api.delete(
            { database: batch.database, id: item.id, rev: item.rev, requestId: batch.requestId },
            { signal, timeoutMs },
          );
          const outcome = await this.#local.serial(() =>
            this.#local.transaction("cannot record an uploaded delete", async (tx) => {
              await tx.setMeta(META_INFLIGHT, undefined);
              return this.#applied(tx, batch.database, item, res.rev, res.seq, true);
            }),
          );
          if (outcome) this.#emit([outcome]);
          return;
        } catch (err) {
          const error = ConnectError.from(err);
          const conflict = conflictOf(error);
          if (conflict) {
            const doc = conflict.current;
            remote = doc && { rev: doc.rev, seq: doc.seq, body: (doc.body ?? {}) as JsonObject };
          } else if (error.code === Code.NotFound && !databaseMissing(error)) {
            remote = undefined; // deleted already (or never created)
          } else {
            throw error;
          }
        }
      }
      await this.#local.transaction("cannot clear the sent batch", async (tx) => tx.setMeta(META_INFLIGHT, undefined));
      await this.#resolve(item.key, item.requestId, remote);
      return;
    }

    const res = await this.#o.api.bulkPut(
      {
        database: batch.database,
        docs: batch.items.map((item) => ({ id: item.id, rev: item.rev, body: item.body ?? {} })),
        requestId: batch.requestId,
      },
      { signal, timeoutMs },
    );
    if (res.results.length !== batch.items.length) {
      throw new ConnectError(`BulkPut answered ${res.results.length} results for ${batch.items.length} documents`, Code.Internal);
    }
    const conflicts: InflightBatch["items"] = [];
    const rejected: { item: InflightBatch["items"][number]; reason: string; message: string }[] = [];
    const outcomes: WriteOutcome[] = [];
    const applied: (WriteOutcome | undefined)[] = [];
    await this.#local.serial(() =>
      this.#local.transaction("cannot record uploaded edits", async (tx) => {
        // One document per item: their reads and writes are independent, so
        // they are issued together (IndexedDB runs them in order, without a
        // round trip each).
        // The pending edits of the batch's documents, in one go.
        const byDoc = await tx.outboxOfDocs(
          batch.database,
          batch.items.filter((_, i) => res.results[i]!.error === "").map((item) => item.id),
        );
        const work: Promise<void>[] = [];
        const done: string[] = [];
        for (const [i, item] of batch.items.entries()) {
          const r = res.results[i]!;
          if (r.error === "") {
            const rows = byDoc.get(item.id) ?? [];
            work.push(this.#applied(tx, batch.database, item, r.rev, r.seq, false, rows, done).then((o) => void (applied[i] = o)));
          } else if (r.error === "conflict") conflicts.push(item);
          else rejected.push({ item, reason: r.error, message: r.reason });
        }
        work.push(Promise.resolve(tx.setMeta(META_INFLIGHT, undefined)));
        await Promise.all(work);
        await tx.deleteOutboxes(done);
      }),
    );
    for (const outcome of applied) if (outcome) outcomes.push(outcome);
    this.#emit(outcomes);
    for (const item of conflicts) {
      const remote = await this.#fetch(batch.database, item.id, signal);
      await this.#resolve(item.key, item.requestId, remote);
    }
    for (const { item, reason, message } of rejected) await this.#reject(item.key, item.requestId, { reason, message });
  }

  /** Records a write the server applied: the entry leaves the outbox, the server's state moves on. */
  async #applied(
    tx: StorageTx,
    database: string,
    item: InflightBatch["items"][number],
    rev: string,
    seq: bigint,
    deleted: boolean,
    outboxOfDoc?: OutboxRow[],
    /** Where to put the key of the settled entry, for the caller to delete with the others; deleted here if absent. */
    done?: string[],
  ): Promise<WriteOutcome | undefined> {
    const known = this.#local.doc(database, item.id);
    const writes: (void | Promise<void>)[] = [];
    if (!known || known.seq < seq) {
      writes.push(tx.putDoc({ database, id: item.id, rev, seq, deleted, body: deleted ? null : item.body }));
    }
    const rows = outboxOfDoc ?? (await tx.outboxOf(database, item.id));
    const entry = rows.find((row) => row.key === item.key);
    if (!entry || entry.requestId !== item.requestId) {
      await Promise.all(writes);
      return undefined; // dropped meanwhile (its database was deleted)
    }
    if (done) done.push(item.key);
    else writes.push(tx.deleteOutbox(item.key));
    await Promise.all(writes);
    await rebaseNext(tx, entry, rev, deleted ? undefined : (item.body ?? undefined), rows);
    return { kind: "applied", requestId: entry.requestId, database, id: item.id, rev, seq, deleted };
  }

  /** The server's current document (undefined: deleted or missing). */
  async #fetch(database: string, id: string, signal: AbortSignal): Promise<Remote | undefined> {
    try {
      const { document } = await this.#o.api.get({ database, id }, { signal, timeoutMs: this.#o.callTimeoutMs ?? 30_000 });
      if (!document) return undefined;
      return { rev: document.rev, seq: document.seq, body: (document.body ?? {}) as JsonObject };
    } catch (err) {
      const error = ConnectError.from(err);
      if (error.code === Code.NotFound && !databaseMissing(error)) return undefined;
      throw error;
    }
  }

  /** A conflict: asks the resolver, then replaces the edit by its result (same outbox position, new request id). */
  async #resolve(key: string, requestId: string, remote: Remote | undefined): Promise<void> {
    const entry = this.#local.outboxEntry(key);
    if (!entry || entry.requestId !== requestId) return;
    let resolution: Resolution;
    if (entry.op === "delete" && !remote) {
      resolution = { delete: true }; // deleted on both sides: nothing to decide
    } else {
      const conflict: WriteConflict = {
        database: entry.database,
        id: entry.id,
        base: entry.baseBody ?? undefined,
        local: entry.op === "put" ? entry.body! : undefined,
        remote: remote?.body,
        remoteRev: remote?.rev ?? "",
      };
      try {
        resolution = await this.#o.resolve(conflict);
      } catch (err) {
        resolution = { reject: `the resolver failed: ${err instanceof Error ? err.message : String(err)}` };
      }
    }
    if ("reject" in resolution) {
      await this.#reject(key, requestId, { reason: "conflict", message: resolution.reject, remote, remoteKnown: true });
      return;
    }
    const outcomes: WriteOutcome[] = [];
    const chosen = resolution;
    await this.#local.serial(() =>
      this.#local.transaction("cannot record a merge", async (tx) => {
        const current = await tx.getOutbox(key);
        if (!current || current.requestId !== requestId) return;
        await this.#knowRemote(tx, current, remote);
        let replacement: OutboxRow | undefined;
        if ("body" in chosen) {
          if (!remote || !jsonEqual(chosen.body, remote.body)) {
            replacement = { ...current, op: "put", body: chosen.body, baseRev: remote?.rev ?? "", baseBody: remote?.body ?? null };
          }
        } else if (remote) {
          replacement = { ...current, op: "delete", body: null, baseRev: remote.rev, baseBody: remote.body };
        }
        if (replacement) {
          replacement = { ...replacement, requestId: uuid(), mergedFrom: current.requestId, failed: undefined };
          await tx.putOutbox(replacement);
        } else {
          await tx.deleteOutbox(key);
          await rebaseNext(tx, current, remote?.rev ?? "", remote?.body);
        }
        outcomes.push({
          kind: "merged",
          requestId,
          database: current.database,
          id: current.id,
          resolution: chosen,
          replacedBy: replacement?.requestId,
        });
      }),
    );
    this.#emit(outcomes);
  }

  /** Remembers the server's state learnt from a conflict (unless something newer is known). */
  async #knowRemote(tx: StorageTx, row: OutboxRow, remote: Remote | undefined): Promise<void> {
    if (!remote) return;
    const known = this.#local.doc(row.database, row.id);
    if (known && known.seq >= remote.seq) return;
    await tx.putDoc({ database: row.database, id: row.id, rev: remote.rev, seq: remote.seq, deleted: false, body: remote.body });
  }

  /** Hands a rejected edit to the app (`onRejected`): drops it (the default) or keeps it as failed. */
  reject(key: string, requestId: string, info: RejectInfo): Promise<void> {
    return this.#reject(key, requestId, info);
  }

  async #reject(key: string, requestId: string, info: RejectInfo): Promise<void> {
    const entry = this.#local.outboxEntry(key);
    if (!entry || entry.requestId !== requestId) return;
    const rejection: Rejection = {
      requestId,
      database: entry.database,
      id: entry.id,
      op: entry.op,
      body: entry.body ?? undefined,
      base: entry.baseBody ?? undefined,
      reason: info.reason,
      message: info.message,
      ...(info.remoteKnown ? { remote: info.remote?.body } : {}),
    };
    let decision: RejectionDecision = "drop";
    try {
      decision = (await this.#o.onRejected?.(rejection)) ?? "drop";
    } catch {
      decision = "drop";
    }
    const outcomes: WriteOutcome[] = [];
    await this.#local.serial(() =>
      this.#local.transaction("cannot record a rejected edit", async (tx) => {
        const current = await tx.getOutbox(key);
        if (!current || current.requestId !== requestId) return;
        await this.#knowRemote(tx, current, info.remote);
        if (decision === "keep") {
          await tx.putOutbox({ ...current, failed: { reason: info.reason, message: info.message } });
        } else {
          await tx.deleteOutbox(key);
          // What follows is based on the server's state, as well as it is known.
          let rev = "";
          let body: JsonObject | undefined;
          if (info.remoteKnown) {
            rev = info.remote?.rev ?? "";
            body = info.remote?.body;
          } else {
            const doc = this.#local.doc(current.database, current.id);
            if (doc && !doc.deleted && doc.body) {
              rev = doc.rev;
              body = doc.body;
            }
          }
          await rebaseNext(tx, current, rev, body);
        }
        outcomes.push({
          kind: "rejected",
          requestId,
          database: current.database,
          id: current.id,
          reason: info.reason,
          message: info.message,
          kept: decision === "keep",
        });
      }),
    );
    this.#emit(outcomes);
  }

  /** A call-level error retrying cannot fix: every edit of the batch is rejected. */
  async #rejectBatch(batch: InflightBatch, error: ConnectError): Promise<void> {
    await this.#local.transaction("cannot clear the refused batch", async (tx) => tx.setMeta(META_INFLIGHT, undefined));
    const reason = rejectionReason(error);
    for (const item of batch.items) await this.#reject(item.key, item.requestId, { reason, message: error.rawMessage });
  }

  #emit(outcomes: WriteOutcome[]): void {
    for (const outcome of outcomes) this.#o.onOutcome?.(outcome);
  }
}
