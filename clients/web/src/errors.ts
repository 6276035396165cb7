/**
 * Reading agsync's rich error details (the `grpc-status-details-bin`
 * trailer: a `google.rpc.Status` holding a `google.rpc.ErrorInfo` and, for
 * conflicts, the current `agsync.v1.Document`).
 *
 * @module
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { DocumentSchema, type Document } from "./gen/agsync/v1/sync_pb.js";
import { ErrorInfoSchema, type ErrorInfo } from "./gen/google/rpc/error_details_pb.js";

/** The domain of agsync's ErrorInfo details. */
export const AGSYNC_DOMAIN = "agsync";

/**
 * The ErrorInfo of domain "agsync" in an error's details, if it has one;
 * with `reason`, only one with that reason ("CONFLICT", "SINCE_TOO_OLD",
 * "SINCE_AHEAD", "SHUTTING_DOWN").
 */
export function errorInfoOf(err: unknown, reason?: string): ErrorInfo | undefined {
  if (!(err instanceof ConnectError)) return undefined;
  return err
    .findDetails(ErrorInfoSchema)
    .find((info) => info.domain === AGSYNC_DOMAIN && (reason === undefined || info.reason === reason));
}

/** What an `ABORTED` revision conflict says. */
export interface Conflict {
  /** The database written to. */
  database: string;
  /** The document id. */
  id: string;
  /** The document's current revision; empty if it is missing or deleted (then retry with an empty rev to create it). */
  currentRev: string;
  /** The current document, unless it is missing or deleted. */
  current: Document | undefined;
  /** The error itself. */
  error: ConnectError;
}

/**
 * The conflict an error reports (gRPC `ABORTED` with an ErrorInfo of reason
 * "CONFLICT"), or undefined for any other error.
 */
export function conflictOf(err: unknown): Conflict | undefined {
  if (!(err instanceof ConnectError) || err.code !== Code.Aborted) return undefined;
  const info = errorInfoOf(err, "CONFLICT");
  if (!info) return undefined;
  const [current] = err.findDetails(DocumentSchema);
  return {
    database: info.metadata["database"] ?? "",
    id: info.metadata["id"] ?? "",
    currentRev: info.metadata["current_rev"] ?? "",
    current,
    error: err,
  };
}

/** A seq carried in an ErrorInfo's metadata (e.g. "since", "oldest_seq"), if present and valid. */
export function seqMetadata(info: ErrorInfo | undefined, key: string): bigint | undefined {
  const value = info?.metadata[key];
  if (value === undefined || !/^[0-9]+$/.test(value)) return undefined;
  return BigInt(value);
}
