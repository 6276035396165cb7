/**
 * agsync's browser client.
 *
 * - {@link openReplica}: an offline-first replica (local reads, optimistic
 *   writes in a durable outbox, upload exactly once, pull, three-way merge,
 *   many tabs) over {@link indexedDbStore}, {@link memoryStore} or, in Node,
 *   `sqliteStore` from `@agsync/web/sqlite`.
 * - {@link createAgsyncTransport}: gRPC-Web to the server, with a bearer token.
 * - {@link SyncClient}: subscribe, load changes, resume, reconnect.
 * - {@link putWithMerge}, {@link conflictOf}, {@link overlayChanges}: conflicts.
 * - The generated messages and `SyncService` (from `proto/`), for everything else.
 *
 * @module
 */
export {
  openReplica,
  Replica,
  type ReplicaOptions,
  type ReplicaStatus,
  type ReplicaError,
  type ReplicaDocument,
  type DocumentChange,
  type DatabaseSpec,
  type TokenProvider,
  type WriteReceipt,
  type Coordination,
  type CoordinationChannel,
} from "./replica.js";
export { fieldMerge, mergeJson, mergeBodies, jsonEqual, type Resolver, type Resolution, type WriteConflict, type FieldMergeOptions } from "./resolve.js";
export type { Rejection, RejectionDecision, WriteOutcome } from "./outbox.js";
export {
  memoryStore,
  ReplicaStorageError,
  type ReplicaStorage,
  type StorageTx,
  type StorageSnapshot,
  type DocRow,
  type OutboxRow,
  type MemoryStoreOptions,
} from "./storage.js";
export { indexedDbStore, deleteIndexedDbStore, type IndexedDbStoreOptions } from "./storage-idb.js";
export { realClock, type Clock } from "./clock.js";
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
