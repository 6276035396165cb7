/**
 * Time and identity for the replica's state machines, behind a small
 * interface so tests drive them with a fake clock.
 *
 * @module
 */

/** Time, as the replica's state machines see it. */
export interface Clock {
  /** Milliseconds since the epoch. */
  now(): number;
  /** Resolves after `ms`, or as soon as `signal` aborts (never rejects). */
  sleep(ms: number, signal: AbortSignal): Promise<void>;
}

/** The real clock: Date.now and setTimeout. */
export const realClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, signal) =>
    new Promise((resolve) => {
      if (signal.aborted) return resolve();
      const timer = setTimeout(done, ms);
      signal.addEventListener("abort", done, { once: true });
      function done() {
        clearTimeout(timer);
        signal.removeEventListener("abort", done);
        resolve();
      }
    }),
};

/** A random UUID (v4): crypto.randomUUID where there is one (Node, secure pages), else from getRandomValues. */
export function uuid(): string {
  const c = globalThis.crypto;
  if (typeof c?.randomUUID === "function") return c.randomUUID();
  const b = new Uint8Array(16);
  c.getRandomValues(b);
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/**
 * The reason given to the replica's own AbortControllers: without one,
 * every abort() builds a DOMException (with a stack), which adds up when
 * waiters are woken at every change.
 */
export const WOKEN = Object.freeze({ name: "Woken", message: "woken" });

/** Resolves after `ms` or when `signal` aborts, with the clock given. */
export function sleepUnless(clock: Clock, ms: number, ...signals: AbortSignal[]): Promise<void> {
  const abort = new AbortController();
  const stop = () => abort.abort(WOKEN);
  for (const signal of signals) {
    if (signal.aborted) return Promise.resolve();
    signal.addEventListener("abort", stop, { once: true });
  }
  return clock.sleep(ms, abort.signal).finally(() => {
    for (const signal of signals) signal.removeEventListener("abort", stop);
  });
}
