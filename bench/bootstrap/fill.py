#!/usr/bin/env python3
"""Fills a database with N documents of ~1 KB for the bootstrap benchmark.

    python3 fill.py --addr 127.0.0.1:41234 --docs 1000000 [--database boot]

Creates the database (sync key `bench.bootstrap.<database>`) and writes
documents d0000000.. with BulkPuts of --batch (1000) documents, a few calls
in flight at once. Each body is a JSON object of a few fields and a 900-char
string (canonical JSON ~1030 bytes). Prints one line: docs, seconds, docs/s.
Exits non-zero if any item fails.
"""
import argparse
import concurrent.futures
import sys
import time

from google.protobuf import struct_pb2

from common import connect, sync_pb2

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TEXT_SOURCE = ALPHABET * (900 // len(ALPHABET) + 2)


def body(i):
    """Document i's body: a few fields and a 900-char string that differs
    from one document to the next."""
    off = i % len(ALPHABET)
    return {
        "n": i,
        "title": f"Document {i}",
        "kind": "note",
        "done": i % 3 == 0,
        "tags": ["bootstrap", f"group-{i % 100}"],
        "text": TEXT_SOURCE[off:off + 900],
    }


def doc_id(i):
    return f"d{i:07d}"


def request(database, start, end):
    req = sync_pb2.BulkPutRequest(database=database)
    for i in range(start, end):
        item = req.docs.add(id=doc_id(i))
        s = struct_pb2.Struct()
        s.update(body(i))
        item.body.CopyFrom(s)
    return req


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--database", default="boot")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--in-flight", type=int, default=3, help="BulkPuts sent at once (default 3)")
    args = ap.parse_args()

    stub = connect(args.addr)
    stub.CreateDatabase(sync_pb2.CreateDatabaseRequest(
        name=args.database, sync_key=f"bench.bootstrap.{args.database}"), timeout=30)

    def send(start):
        end = min(start + args.batch, args.docs)
        reply = stub.BulkPut(request(args.database, start, end), timeout=300)
        failed = [r for r in reply.results if r.error]
        if failed or len(reply.results) != end - start:
            raise RuntimeError(f"BulkPut of {doc_id(start)}..: {len(failed)} failed, "
                               f"first: {failed[0] if failed else 'short reply'}")
        return end - start

    t0 = time.monotonic()
    written = 0
    with concurrent.futures.ThreadPoolExecutor(args.in_flight) as pool:
        for n in pool.map(send, range(0, args.docs, args.batch)):
            written += n
    secs = time.monotonic() - t0
    print(f"fill docs={written} secs={secs:.1f} docs_per_s={written / secs:.0f}", flush=True)
    if written != args.docs:
        sys.exit(f"fill: wrote {written} of {args.docs}")


if __name__ == "__main__":
    main()
