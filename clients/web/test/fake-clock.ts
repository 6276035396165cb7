// A clock for the replica's state machines in tests: time moves only when
// the test says so (advance), or, in auto mode, each sleep ends on the next
// macrotask and moves time by its length. Every requested delay is recorded.
import type { Clock } from "../src/clock.js";

interface Timer {
  at: number;
  resolve: () => void;
}

export class FakeClock implements Clock {
  time = 1_700_000_000_000;
  /** Every delay asked for, in order. */
  readonly sleeps: number[] = [];
  readonly #timers = new Set<Timer>();
  /** Auto mode: sleeps end at once (on the next macrotask), time jumps by their length. */
  auto: boolean;

  constructor(options: { auto?: boolean } = {}) {
    this.auto = options.auto ?? true;
  }

  now(): number {
    return this.time;
  }

  sleep(ms: number, signal: AbortSignal): Promise<void> {
    this.sleeps.push(ms);
    return new Promise((resolve) => {
      if (signal.aborted) return resolve();
      if (this.auto) {
        const timer = setTimeout(() => {
          signal.removeEventListener("abort", abort);
          this.time += ms;
          resolve();
        }, 1);
        const abort = () => {
          clearTimeout(timer);
          resolve();
        };
        signal.addEventListener("abort", abort, { once: true });
        return;
      }
      const timer: Timer = { at: this.time + ms, resolve: () => resolve() };
      this.#timers.add(timer);
      signal.addEventListener(
        "abort",
        () => {
          this.#timers.delete(timer);
          resolve();
        },
        { once: true },
      );
    });
  }

  /** Moves time forward, ending the sleeps due by then. */
  async advance(ms: number): Promise<void> {
    this.time += ms;
    for (const timer of [...this.#timers]) {
      if (timer.at <= this.time) {
        this.#timers.delete(timer);
        timer.resolve();
      }
    }
    await new Promise((r) => setTimeout(r, 1));
  }

  /** Sleeps waiting now. */
  get waiting(): number {
    return this.#timers.size;
  }
}
