/**
 * Writing a document when someone else may have written it first: on a
 * revision conflict, merge with the current document (sent with the error,
 * no extra read) and retry with its revision.
 *
 * @module
 */
import type { JsonObject, JsonValue } from "@bufbuild/protobuf";
import type { Client } from "@connectrpc/connect";
import { conflictOf, type Conflict } from "./errors.js";
import type { Document, PutResponse, SyncService } from "./gen/agsync/v1/sync_pb.js";

/**
 * Merges your body with the current document after a conflict. `mine` is the
 * body the failed Put sent; `theirs` the current document, or undefined if
 * it was deleted (or never existed: then the retry creates it). Returns the
 * body to write with the current revision, or undefined to give up (the
 * conflict is then thrown).
 */
export type MergeFunction = (
  mine: JsonObject,
  theirs: Document | undefined,
  conflict: Conflict,
) => JsonObject | undefined | Promise<JsonObject | undefined>;

/** Options of {@link putWithMerge}. */
export interface PutWithMergeOptions {
  /** How many Puts at most, the first included. Default 5. */
  maxAttempts?: number;
  /** The notification's audience (PutRequest.notify_aliases); empty: everyone. */
  notifyAliases?: string[];
  /** Cancels the Puts. */
  signal?: AbortSignal;
}

/** What {@link putWithMerge} wrote. */
export interface PutWithMergeResult extends Pick<PutResponse, "id" | "rev" | "seq"> {
  /** The body written: yours, or the last merge's. */
  body: JsonObject;
  /** How many Puts it took (1: no conflict). */
  attempts: number;
}

/** A document to write: no `rev` (or "") creates it, otherwise `rev` is the revision your edit is based on. */
export interface DocumentWrite {
  id: string;
  rev?: string;
  body: JsonObject;
}

/**
 * Puts a document; on a revision conflict calls `merge(mine, theirs)` and
 * puts its result with the current revision, until a Put succeeds, merge
 * returns undefined, or `maxAttempts` Puts conflicted. Then the last conflict
 * (a `ConnectError` with code `ABORTED`; {@link conflictOf} reads it) is
 * thrown. Any other error is thrown at once.
 */
export async function putWithMerge(
  client: Client<typeof SyncService>,
  database: string,
  doc: DocumentWrite,
  merge: MergeFunction,
  options: PutWithMergeOptions = {},
): Promise<PutWithMergeResult> {
  const maxAttempts = Math.max(1, options.maxAttempts ?? 5);
  let rev = doc.rev ?? "";
  let body = doc.body;
  for (let attempt = 1; ; attempt += 1) {
    try {
      const res = await client.put(
        { database, id: doc.id, rev, body, notifyAliases: options.notifyAliases ?? [] },
        options.signal ? { signal: options.signal } : {},
      );
      return { id: res.id, rev: res.rev, seq: res.seq, body, attempts: attempt };
    } catch (err) {
      const conflict = conflictOf(err);
      if (!conflict || attempt >= maxAttempts) throw err;
      const merged = await merge(body, conflict.current, conflict);
      if (merged === undefined) throw err;
      body = merged;
      rev = conflict.currentRev;
    }
  }
}

/** JSON text with object keys sorted, so equal values compare equal whatever their key order. */
function canonical(value: JsonValue | undefined): string {
  if (value === undefined) return "undefined";
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

function sameJson(a: JsonValue | undefined, b: JsonValue | undefined): boolean {
  return canonical(a) === canonical(b);
}

/**
 * A shallow three-way merge of top-level fields: `theirs` with your changes
 * laid over it, where your changes are the fields of `mine` that differ from
 * `base` (the version you edited) and the fields of `base` you removed.
 * Fields only they changed keep their value. If you and they both changed a
 * field, yours wins: show the result before writing it.
 */
export function overlayChanges(base: JsonObject, mine: JsonObject, theirs: JsonObject): JsonObject {
  const merged: JsonObject = { ...theirs };
  for (const [key, value] of Object.entries(mine)) {
    if (!sameJson(value, base[key])) merged[key] = value;
  }
  for (const key of Object.keys(base)) {
    if (!(key in mine)) delete merged[key];
  }
  return merged;
}
