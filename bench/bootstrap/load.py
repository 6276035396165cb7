#!/usr/bin/env python3
"""The Python bootstrap loader: a fresh client reads a whole database with
paged Changes (include_docs, from since=0) until a page is empty, or with
--snapshot as a client of the Snapshot RPC does.

    python3 load.py --addr 127.0.0.1:41234 --expect 1000000 [--limit 10000]
        [--max-receive-bytes 4194304] [--to-dict] [--snapshot] [--profile FILE]

Counts the documents, checks that seqs increase strictly across all pages
and that the count is --expect; prints one line (docs, seconds, docs/s,
pages, mean docs/page, mean ms/page) and exits non-zero on a failed check.
The pages are decoded by grpcio (protobuf's C "upb" backend); with --to-dict
each body is also turned into a Python dict (what an app that keeps the
documents would do), which is pure Python and the expensive part.

--snapshot (or BOOTSTRAP_SNAPSHOT=1): one Snapshot stream with json_bodies,
each body decoded with json.loads (so always a dict, as --to-dict does for
paged Changes), checking that the last message is `complete` and that no seq
is above its snapshot_seq S; then Changes from S (json_bodies, --limit)
until a page is empty, as a client goes on from a snapshot. "pages" are then
the stream's messages plus the Changes pages with documents, ms/page the
mean wait for one, and the line says client=python-snapshot.
"""
import argparse
import json
import os
import sys
import time

from google.protobuf import json_format

from common import connect, sync_pb2


def load(stub, database, limit, to_dict):
    """Reads every change of `database`; returns (docs, pages, page_secs)."""
    since, docs, pages, last_seq = 0, 0, 0, 0
    page_secs = []
    while True:
        t = time.monotonic()
        page = stub.Changes(sync_pb2.ChangesRequest(
            database=database, since=since, limit=limit, include_docs=True), timeout=60)
        page_secs.append(time.monotonic() - t)
        changes = page.changes
        if not changes:
            return docs, pages, page_secs
        pages += 1
        for c in changes:
            if c.seq <= last_seq:
                raise AssertionError(f"seq {c.seq} after {last_seq}: not increasing")
            last_seq = c.seq
            if to_dict and not c.deleted:
                json_format.MessageToDict(c.body)
        docs += len(changes)
        if page.last_seq != last_seq:
            raise AssertionError(f"last_seq {page.last_seq} is not the page's last seq {last_seq}")
        since = page.last_seq


def load_snapshot(stub, database, limit):
    """Reads `database` with one Snapshot stream, then Changes from its
    snapshot_seq until a page is empty; returns (docs, pages, page_secs)."""
    docs, pages, last_seq = 0, 0, 0
    page_secs = []
    snapshot_seq, complete = None, False
    # No deadline: the stream lasts as long as the database takes to read.
    messages = iter(stub.Snapshot(sync_pb2.SnapshotRequest(database=database, json_bodies=True)))
    while True:
        t = time.monotonic()
        message = next(messages, None)
        page_secs.append(time.monotonic() - t)
        if message is None:
            break
        if complete:
            raise AssertionError("a message after the complete one")
        if snapshot_seq is None:
            snapshot_seq = message.snapshot_seq
        elif message.snapshot_seq != snapshot_seq:
            raise AssertionError(f"snapshot_seq {message.snapshot_seq} after {snapshot_seq}")
        complete = message.complete
        if not message.changes and not complete:
            raise AssertionError("a message without changes before the last one")
        if message.changes:
            pages += 1
        for c in message.changes:
            if c.seq <= last_seq:
                raise AssertionError(f"seq {c.seq} after {last_seq}: not increasing")
            if c.seq > snapshot_seq or c.deleted:
                raise AssertionError(f"change {c.id} at seq {c.seq} (deleted={c.deleted}) in a snapshot at {snapshot_seq}")
            last_seq = c.seq
            if not c.body_json:
                raise AssertionError(f"change {c.id} has no body_json: the server ignored json_bodies")
            json.loads(c.body_json)
        docs += len(message.changes)
    if not complete:
        raise AssertionError("the Snapshot stream ended without its complete message")
    since = snapshot_seq
    while True:
        t = time.monotonic()
        page = stub.Changes(sync_pb2.ChangesRequest(
            database=database, since=since, limit=limit, include_docs=True, json_bodies=True), timeout=60)
        page_secs.append(time.monotonic() - t)
        if not page.changes:
            return docs, pages, page_secs
        pages += 1
        for c in page.changes:
            if c.seq <= max(last_seq, snapshot_seq):
                raise AssertionError(f"seq {c.seq} after the snapshot's {snapshot_seq} or {last_seq}")
            last_seq = c.seq
            if not c.deleted:
                json.loads(c.body_json)
        docs += len(page.changes)
        since = page.last_seq


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--database", default="boot")
    ap.add_argument("--expect", type=int, required=True, help="documents the database holds")
    ap.add_argument("--limit", type=int, default=10000, help="Changes page size (default 10000)")
    ap.add_argument("--max-receive-bytes", type=int, default=4 * 1024 * 1024,
                    help="grpcio's receive limit (default 4 MiB, grpcio's own default)")
    ap.add_argument("--to-dict", action="store_true", help="also convert each body to a dict")
    ap.add_argument("--snapshot", action="store_true", default=os.environ.get("BOOTSTRAP_SNAPSHOT") == "1",
                    help="load with the Snapshot RPC (json_bodies), then Changes from its seq"
                         " (default: BOOTSTRAP_SNAPSHOT=1)")
    ap.add_argument("--profile", metavar="FILE", help="write a cProfile of the load to FILE")
    args = ap.parse_args()

    stub = connect(args.addr, args.max_receive_bytes)
    profiler = None
    if args.profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    t0, cpu0 = time.monotonic(), time.process_time()
    if args.snapshot:
        docs, pages, page_secs = load_snapshot(stub, args.database, args.limit)
    else:
        docs, pages, page_secs = load(stub, args.database, args.limit, args.to_dict)
    secs, cpu = time.monotonic() - t0, time.process_time() - cpu0
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    rpc_secs = sum(page_secs)
    client = "python-snapshot" if args.snapshot else "python"
    print(f"client={client} docs={docs} secs={secs:.2f} docs_per_s={docs / secs:.0f} pages={pages} "
          f"docs_per_page={docs / max(pages, 1):.0f} ms_per_page={1000 * rpc_secs / max(pages, 1):.1f} "
          f"rpc_share={rpc_secs / secs:.2f} cpu_s={cpu:.1f}", flush=True)
    if docs != args.expect:
        sys.exit(f"load.py: loaded {docs} documents, expected {args.expect}")


if __name__ == "__main__":
    main()
