/**
 * Conflicts between a pending local edit and a newer server revision:
 * the resolver the replica calls with `{ base, local, remote }` (RxDB's
 * conflictHandler, with the common ancestor named), and the default one, a
 * field-level three-way JSON merge. Pure functions: no I/O, no state.
 *
 * @module
 */
import type { JsonObject, JsonValue } from "@bufbuild/protobuf";

/** A pending edit that met a newer server revision. */
export interface WriteConflict {
  database: string;
  id: string;
  /** The body the edit started from (what the app saw when it wrote); undefined: there was no document. */
  base: JsonObject | undefined;
  /** The edit: its new body, or undefined for a delete. */
  local: JsonObject | undefined;
  /** The server's current body; undefined when the document is deleted (or was never created). */
  remote: JsonObject | undefined;
  /** The server's current revision; "" when there is no live document. */
  remoteRev: string;
}

/**
 * What to do with a conflict:
 * - `{ body }`: write this body on top of the server's current revision
 *   (if it equals the server's body, nothing is written);
 * - `{ delete: true }`: delete the document (nothing is written if it is
 *   already deleted);
 * - `{ reject: reason }`: keep the server's version; the edit is reported
 *   to the app as rejected, with its content (`onRejected`).
 */
export type Resolution = { body: JsonObject } | { delete: true } | { reject: string };

/** Decides a conflict; may be async (e.g. to ask the user). */
export type Resolver = (conflict: WriteConflict) => Resolution | Promise<Resolution>;

/** Options of {@link fieldMerge}. */
export interface FieldMergeOptions {
  /** Who wins where both sides changed the same field, and edit against delete. Default "remote". */
  prefer?: "remote" | "local";
}

function isObject(value: JsonValue | undefined): value is JsonObject {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Deep equality of JSON values (object key order does not matter). */
export function jsonEqual(a: JsonValue | undefined, b: JsonValue | undefined): boolean {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Array.isArray(a)) {
    if (!Array.isArray(b) || a.length !== b.length) return false;
    for (let i = 0; i < a.length; i++) if (!jsonEqual(a[i], b[i])) return false;
    return true;
  }
  if (Array.isArray(b)) return false;
  const keys = Object.keys(a);
  if (keys.length !== Object.keys(b).length) return false;
  for (const key of keys) {
    if (!Object.prototype.hasOwnProperty.call(b, key) || !jsonEqual(a[key], b[key])) return false;
  }
  return true;
}

/**
 * A three-way merge of JSON values, field by field: where only one side
 * changed a field (relative to `base`) its value is taken; where both
 * changed it to different values, `prefer`'s; objects on both sides are
 * merged recursively, arrays and scalars are replaced whole. `undefined`
 * stands for an absent field (a removed field is a change).
 */
export function mergeJson(
  base: JsonValue | undefined,
  local: JsonValue | undefined,
  remote: JsonValue | undefined,
  prefer: "remote" | "local" = "remote",
): JsonValue | undefined {
  if (jsonEqual(local, remote)) return local;
  if (jsonEqual(local, base)) return remote;
  if (jsonEqual(remote, base)) return local;
  if (isObject(local) && isObject(remote)) {
    const b = isObject(base) ? base : {};
    const merged: JsonObject = {};
    for (const key of new Set([...Object.keys(remote), ...Object.keys(local), ...Object.keys(b)])) {
      const value = mergeJson(b[key], local[key], remote[key], prefer);
      if (value !== undefined) merged[key] = value;
    }
    return merged;
  }
  return prefer === "remote" ? remote : local;
}

/** {@link mergeJson} of three document bodies (absent ones count as {}). */
export function mergeBodies(
  base: JsonObject | undefined,
  local: JsonObject,
  remote: JsonObject,
  prefer: "remote" | "local" = "remote",
): JsonObject {
  return mergeJson(base ?? {}, local, remote, prefer) as JsonObject;
}

/**
 * The default resolver: a field-level three-way merge.
 * - edit against edit: {@link mergeBodies} (disjoint changes combine; on an
 *   overlap `prefer` wins, the server by default);
 * - edit against a delete on the server: with `prefer: "remote"` the edit is
 *   rejected (the document stays deleted), with "local" it is written again;
 * - delete against an edit on the server: with "remote" the delete is
 *   rejected (the edited document stays), with "local" it is deleted.
 *   A delete of a document the server still has unchanged since the base
 *   goes ahead either way.
 */
export function fieldMerge(options: FieldMergeOptions = {}): Resolver {
  const prefer = options.prefer ?? "remote";
  return ({ base, local, remote }) => {
    if (local !== undefined) {
      if (remote !== undefined) return { body: mergeBodies(base, local, remote, prefer) };
      return prefer === "remote" ? { reject: "deleted on the server" } : { body: local };
    }
    if (remote === undefined || jsonEqual(remote, base)) return { delete: true };
    return prefer === "remote" ? { reject: "changed on the server" } : { delete: true };
  };
}
