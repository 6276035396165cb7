#!/usr/bin/env python3
"""The design note's session against agsync, in Python, as a test.

1. A subscriber listens to the database's sync key. On each notification it
   runs load_remote_changes(): Changes since the last seq it loaded, into a
   local replica (the "loadRemoteChanges" pattern).
2. The app creates a database, gets an id, creates a car, updates it, then a
   second writer with a stale revision gets ABORTED and handles the conflict:
   it takes the current document (carried in the error details; re-read with
   Get if absent), merges its change and retries.
3. The replica ends equal to the server's document, and a client that was
   away resumes with `since` and receives exactly what it missed.

Run against a server: `python3 session.py` (AGSYNC_ADDR, default
127.0.0.1:50051). Exits non-zero, loudly, if anything is not as expected.
"""
import queue
import threading
import uuid

import grpc
from grpc_status import rpc_status

from agsync_client import connect, struct, to_dict, sync_pb2

checks = {"passed": 0}


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    checks["passed"] += 1
    print(f"ok: {what}")


class Replica:
    """The local copy a device keeps, filled by load_remote_changes()."""

    def __init__(self, stub, database):
        self.stub, self.database = stub, database
        self.docs, self.last_seq = {}, 0
        self.loaded = queue.Queue()

    def load_remote_changes(self):
        while True:
            page = self.stub.Changes(sync_pb2.ChangesRequest(
                database=self.database, since=self.last_seq, include_docs=True))
            for change in page.changes:
                if change.deleted:
                    self.docs.pop(change.id, None)
                else:
                    self.docs[change.id] = (change.rev, to_dict(change.body))
            self.last_seq = page.last_seq
            if not page.changes:
                break
        self.loaded.put(self.last_seq)


def subscriber(stub, sync_key, replica, ready, stop):
    """Listens to sync_key; every notification triggers load_remote_changes."""
    stream = stub.Subscribe(sync_pb2.SubscribeRequest(sync_keys=[sync_key]))
    stop.append(stream)
    try:
        for event in stream:
            kind = event.WhichOneof("event")
            if kind == "subscribed":
                ready.set()
            elif kind == "notification":
                replica.load_remote_changes()
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            raise


def current_from_conflict(error):
    """The current document carried in a conflict's rich error details, if any."""
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(sync_pb2.Document.DESCRIPTOR):
            doc = sync_pb2.Document()
            detail.Unpack(doc)
            return doc
    return None


def put_with_retry(stub, database, doc_id, rev, change):
    """Writes `change` merged over the document; on conflict, takes the current
    document (from the error details, else by re-reading) and retries."""
    body, used_details = change, False
    for _ in range(10):
        try:
            return stub.Put(sync_pb2.PutRequest(
                database=database, id=doc_id, rev=rev, body=struct(body))), used_details
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ABORTED:
                raise
            current = current_from_conflict(e)
            used_details = current is not None
            if current is None:
                current = stub.Get(sync_pb2.GetRequest(database=database, id=doc_id)).document
            print(f"conflict: now at {current.rev}; merging and retrying")
            rev, body = current.rev, {**to_dict(current.body), **change}
    raise AssertionError("too many conflicts")


def main():
    stub = connect()
    suffix = uuid.uuid4().hex[:8]
    database, sync_key = f"cars_py_{suffix}", f"org.example.sync.Cars.{suffix}"

    created = stub.CreateDatabase(sync_pb2.CreateDatabaseRequest(name=database, sync_key=sync_key))
    check(created.database.sync_key == sync_key, "database created with its sync key")

    replica, ready, streams = Replica(stub, database), threading.Event(), []
    listener = threading.Thread(target=subscriber, args=(stub, sync_key, replica, ready, streams), daemon=True)
    listener.start()
    check(ready.wait(10), "subscriber is live")

    doc_id = stub.NewId(sync_pb2.NewIdRequest()).ids[0]
    check(len(doc_id) == 32, "NewId hands out a 32-hex id")

    v1 = stub.Put(sync_pb2.PutRequest(database=database, id=doc_id,
                                      body=struct({"model": "Mustang", "year": 1969})))
    check(v1.rev.startswith("1-"), f"created at {v1.rev}")
    v2 = stub.Put(sync_pb2.PutRequest(database=database, id=doc_id, rev=v1.rev,
                                      body=struct({"model": "Mustang", "year": 1969, "color": "red"})))
    check(v2.rev.startswith("2-"), f"updated to {v2.rev}")

    # A second device still holds rev 1.
    try:
        stub.Put(sync_pb2.PutRequest(database=database, id=doc_id, rev=v1.rev, body=struct({"year": 1970})))
        raise AssertionError("a stale rev must conflict")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.ABORTED, "stale rev 1 is ABORTED")
        check("Document update conflict" in e.details(), "the message says it is a conflict")
    v3, used_details = put_with_retry(stub, database, doc_id, v1.rev, {"year": 1970})
    check(used_details, "the conflict carried the current document in its details")
    check(v3.rev.startswith("3-"), f"conflict resolved by merging and retrying: {v3.rev}")

    doc = stub.Get(sync_pb2.GetRequest(database=database, id=doc_id)).document
    check(to_dict(doc.body) == {"model": "Mustang", "year": 1970, "color": "red"}, "the merge kept both edits")

    # The subscriber loaded every change through Changes.
    while replica.last_seq < v3.seq:
        replica.loaded.get(timeout=10)
    check(replica.docs[doc_id] == (doc.rev, to_dict(doc.body)), "the replica caught up via Changes")

    # A device that was away resumes from the last seq it saw.
    missed = stub.Notify(sync_pb2.NotifyRequest(sync_key=sync_key, attributes={"reason": "demo"})).seq
    resumed = stub.Subscribe(sync_pb2.SubscribeRequest(sync_keys=[sync_key], since=v1.seq))
    seen = []
    for event in resumed:
        kind = event.WhichOneof("event")
        if kind == "notification":
            seen.append(event.notification.seq)
        elif kind == "subscribed":
            break
    resumed.cancel()
    check(seen == [v2.seq, v3.seq, missed], f"resume with since={v1.seq} replays {seen}")

    for s in streams:
        s.cancel()
    print(f"{checks['passed']} passed, 0 failed")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # fail loudly, with the summary line CI reads
        print(f"FAILED: {type(e).__name__}: {e}")
        print(f"{checks['passed']} passed, 1 failed")
        raise SystemExit(1)
