/**
 * agsync's browser client.
 *
 * - {@link createAgsyncTransport}: gRPC-Web to the server, with a bearer token.
 * - {@link SyncClient}: subscribe, load changes, resume, reconnect.
 * - {@link putWithMerge}, {@link conflictOf}, {@link overlayChanges}: conflicts.
 * - The generated messages and `SyncService` (from `proto/`), for everything else.
 *
 * @module
 */
export { createAgsyncTransport, bearerAuth, type AgsyncTransportOptions, type TokenSource } from "./transport.js";
export {
  SyncClient,
  type SyncClientOptions,
  type SyncStatus,
  type ChangesBatch,
  type ChangedDocument,
  type ResyncInfo,
} from "./sync-client.js";
export {
  MemoryStateStore,
  LocalStorageStateStore,
  parseStoredState,
  formatStoredState,
  type SyncState,
  type SyncStateStore,
} from "./store.js";
export {
  putWithMerge,
  overlayChanges,
  type MergeFunction,
  type PutWithMergeOptions,
  type PutWithMergeResult,
  type DocumentWrite,
} from "./merge.js";
export { conflictOf, errorInfoOf, seqMetadata, AGSYNC_DOMAIN, type Conflict } from "./errors.js";
export { backoffDelay, type BackoffOptions } from "./backoff.js";
export * from "./gen/agsync/v1/sync_pb.js";
export { ErrorInfoSchema, type ErrorInfo } from "./gen/google/rpc/error_details_pb.js";
export { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";
export type { JsonObject, JsonValue } from "@bufbuild/protobuf";
