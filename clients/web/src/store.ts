/**
 * Where a {@link SyncClient} keeps its position: the seq of the last
 * notification it handled, and per database the seq it has loaded up to.
 * Keep it next to the app's copy of the documents: the two belong together.
 *
 * @module
 */

/** A SyncClient's position. */
export interface SyncState {
  /** The sync keys that `seq` is a position in (sorted). */
  syncKeys: string[];
  /**
   * The seq of the last notification or progress event handled: the `since`
   * of the next Subscribe. Undefined before the first sync, and after a
   * resync: the next Subscribe starts live and every database is loaded.
   */
  seq?: bigint | undefined;
  /**
   * Per database name, where its load got to: the `last_seq` of the last
   * Changes page loaded, or the `lastSeq` of the last Snapshot batch (see
   * `ChangesBatch.lastSeq`): the `since` of the next load.
   */
  databases: Record<string, bigint>;
}

/** Keeps a {@link SyncState}. Methods may be synchronous or return promises (e.g. for IndexedDB). */
export interface SyncStateStore {
  /** The saved state; undefined if none was saved (or it is unreadable). */
  get(): SyncState | undefined | Promise<SyncState | undefined>;
  /** Saves the state (replacing any saved before). */
  set(state: SyncState): void | Promise<void>;
}

/** Returns a deep copy, so callers never share a store's object. */
function copy(state: SyncState): SyncState {
  return { syncKeys: [...state.syncKeys], seq: state.seq, databases: { ...state.databases } };
}

/** A store in memory: the position lasts as long as the page. */
export class MemoryStateStore implements SyncStateStore {
  #state: SyncState | undefined;

  constructor(initial?: SyncState) {
    this.#state = initial && copy(initial);
  }

  get(): SyncState | undefined {
    return this.#state && copy(this.#state);
  }

  set(state: SyncState): void {
    this.#state = copy(state);
  }
}

/** The JSON form of a SyncState: seqs as decimal strings (JSON has no 64-bit integers). */
interface StoredState {
  v: 1;
  syncKeys: string[];
  seq: string | null;
  databases: Record<string, string>;
}

const SEQ = /^[0-9]+$/;

/** Parses a stored state; undefined if it is not one (never throws). */
export function parseStoredState(text: string | null): SyncState | undefined {
  if (text === null) return undefined;
  try {
    const raw = JSON.parse(text) as Partial<StoredState>;
    if (raw.v !== 1 || !Array.isArray(raw.syncKeys) || typeof raw.databases !== "object" || raw.databases === null) {
      return undefined;
    }
    const databases: Record<string, bigint> = {};
    for (const [name, seq] of Object.entries(raw.databases)) {
      if (typeof seq !== "string" || !SEQ.test(seq)) return undefined;
      databases[name] = BigInt(seq);
    }
    let seq: bigint | undefined;
    if (typeof raw.seq === "string" && SEQ.test(raw.seq)) seq = BigInt(raw.seq);
    else if (raw.seq !== null && raw.seq !== undefined) return undefined;
    return { syncKeys: raw.syncKeys.filter((k): k is string => typeof k === "string"), seq, databases };
  } catch {
    return undefined;
  }
}

/** The JSON text of a state, as {@link parseStoredState} reads it. */
export function formatStoredState(state: SyncState): string {
  const stored: StoredState = {
    v: 1,
    syncKeys: state.syncKeys,
    seq: state.seq === undefined ? null : state.seq.toString(),
    databases: Object.fromEntries(Object.entries(state.databases).map(([name, seq]) => [name, seq.toString()])),
  };
  return JSON.stringify(stored);
}

/**
 * A store in `localStorage` (or any Web Storage), under one key: the position
 * survives reloads, so a page resumes where it was. Use one key per
 * SyncClient; two tabs of one app each need their own key (or share one tab's
 * sync through a BroadcastChannel).
 */
export class LocalStorageStateStore implements SyncStateStore {
  readonly key: string;
  readonly #storage: Storage;

  constructor(key = "agsync.sync-state", storage: Storage = globalThis.localStorage) {
    this.key = key;
    this.#storage = storage;
  }

  get(): SyncState | undefined {
    return parseStoredState(this.#storage.getItem(this.key));
  }

  set(state: SyncState): void {
    this.#storage.setItem(this.key, formatStoredState(state));
  }

  /** Forgets the position: the next sync loads everything again. */
  clear(): void {
    this.#storage.removeItem(this.key);
  }
}
