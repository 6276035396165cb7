#!/usr/bin/env python3
"""The Python bootstrap loader: a fresh client reads a whole database with
paged Changes (include_docs, from since=0) until a page is empty.

    python3 load.py --addr 127.0.0.1:41234 --expect 1000000 [--limit 10000]
        [--max-receive-bytes 4194304] [--to-dict] [--profile FILE]

Counts the documents, checks that seqs increase strictly across all pages
and that the count is --expect; prints one line (docs, seconds, docs/s,
pages, mean docs/page, mean ms/page) and exits non-zero on a failed check.
The pages are decoded by grpcio (protobuf's C "upb" backend); with --to-dict
each body is also turned into a Python dict (what an app that keeps the
documents would do), which is pure Python and the expensive part.
"""
import argparse
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--database", default="boot")
    ap.add_argument("--expect", type=int, required=True, help="documents the database holds")
    ap.add_argument("--limit", type=int, default=10000, help="Changes page size (default 10000)")
    ap.add_argument("--max-receive-bytes", type=int, default=4 * 1024 * 1024,
                    help="grpcio's receive limit (default 4 MiB, grpcio's own default)")
    ap.add_argument("--to-dict", action="store_true", help="also convert each body to a dict")
    ap.add_argument("--profile", metavar="FILE", help="write a cProfile of the load to FILE")
    args = ap.parse_args()

    stub = connect(args.addr, args.max_receive_bytes)
    profiler = None
    if args.profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    t0, cpu0 = time.monotonic(), time.process_time()
    docs, pages, page_secs = load(stub, args.database, args.limit, args.to_dict)
    secs, cpu = time.monotonic() - t0, time.process_time() - cpu0
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    rpc_secs = sum(page_secs)
    print(f"client=python docs={docs} secs={secs:.2f} docs_per_s={docs / secs:.0f} pages={pages} "
          f"docs_per_page={docs / max(pages, 1):.0f} ms_per_page={1000 * rpc_secs / max(pages, 1):.1f} "
          f"rpc_share={rpc_secs / secs:.2f} cpu_s={cpu:.1f}", flush=True)
    if docs != args.expect:
        sys.exit(f"load.py: loaded {docs} documents, expected {args.expect}")


if __name__ == "__main__":
    main()
