/**
 * Reconnect delays: exponential, capped, with jitter.
 *
 * @module
 */

/** How the delay between reconnect attempts grows. */
export interface BackoffOptions {
  /** The ceiling of the first delay, in ms. Default 500. */
  initialMs?: number;
  /** The largest ceiling, in ms. Default 30000. */
  maxMs?: number;
  /** The factor from one ceiling to the next. Default 2. */
  multiplier?: number;
}

/**
 * The delay in ms before reconnect attempt `attempt` (0 for the first):
 * the ceiling min(maxMs, initialMs * multiplier^attempt), of which a random
 * upper half is used ("equal jitter"), so that clients cut off together by a
 * server restart do not all come back at the same instant, and none comes
 * back at once.
 */
export function backoffDelay(attempt: number, options: BackoffOptions = {}, random: () => number = Math.random): number {
  const initial = options.initialMs ?? 500;
  const max = options.maxMs ?? 30_000;
  const multiplier = options.multiplier ?? 2;
  const ceiling = Math.min(max, initial * multiplier ** Math.max(0, attempt));
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}
