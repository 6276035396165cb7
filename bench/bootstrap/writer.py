#!/usr/bin/env python3
"""The concurrent small-writes prober: one Put of a new ~100-byte document
every --interval-ms (10) into a database of its own, each call timed.

    python3 writer.py --addr 127.0.0.1:41234 --label idle --seconds 10
    python3 writer.py --addr 127.0.0.1:41234 --label load --seconds 600 --ready-file F &   # ends on SIGTERM

Runs until --seconds have passed or it gets SIGTERM/SIGINT, then prints one
line: label, puts, errors, p50/p99/max latency in ms, and how many Puts
started late (the previous one took longer than the interval). The schedule
is a fixed rate: a slow Put delays the next one, never more than one is in
flight, and late Puts do not bunch up to catch up.
"""
import argparse
import os
import signal
import time

import grpc

from common import connect, percentile, sync_pb2


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--database", default="probe")
    ap.add_argument("--label", default="writer")
    ap.add_argument("--interval-ms", type=float, default=10)
    ap.add_argument("--seconds", type=float, required=True, help="stop after this long at the latest")
    ap.add_argument("--ready-file", help="created once connected, just before the first Put")
    args = ap.parse_args()

    stop = {"now": False}

    def on_signal(_signum, _frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    stub = connect(args.addr)
    try:
        stub.CreateDatabase(sync_pb2.CreateDatabaseRequest(name=args.database), timeout=10)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    prefix = f"{args.label}-{os.getpid()}-{time.time_ns()}"
    body = {"kind": "probe", "note": "x" * 64}

    if args.ready_file:
        open(args.ready_file, "w").close()
    latencies, errors, late, failing = [], 0, 0, 0
    interval = args.interval_ms / 1000
    start = time.monotonic()
    deadline = start + args.seconds
    next_at = start
    i = 0
    while not stop["now"] and time.monotonic() < deadline:
        now = time.monotonic()
        if next_at > now:
            time.sleep(next_at - now)
        elif now - next_at > interval:
            late += 1
            next_at = now
        req = sync_pb2.PutRequest(database=args.database, id=f"{prefix}-{i}")
        req.body.update({**body, "i": i})
        t = time.monotonic()
        try:
            stub.Put(req, timeout=10)
            latencies.append((time.monotonic() - t) * 1000)
            failing = 0
        except grpc.RpcError:
            errors += 1
            failing += 1
            if failing >= 100:
                break  # 100 failures in a row: the server is gone
        i += 1
        next_at += interval

    latencies.sort()
    p = lambda q: f"{percentile(latencies, q):.2f}" if latencies else "nan"  # noqa: E731
    print(f"writer label={args.label} puts={len(latencies)} errors={errors} "
          f"p50_ms={p(50)} p99_ms={p(99)} max_ms={p(100)} late={late}", flush=True)


if __name__ == "__main__":
    main()
