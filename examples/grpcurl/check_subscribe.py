#!/usr/bin/env python3
"""The README's subscribe/notify flow with the real grpcurl, as a test: a
streaming Subscribe in one process (terminal 1), Put and Notify from another
(terminal 2), then a client that was away resumes with `since`.

Needs grpcurl on PATH and a server at AGSYNC_ADDR (default 127.0.0.1:50051).
Exits non-zero with a message if anything differs from what is expected.
"""
import json
import os
import subprocess
import sys
import time
import uuid

ADDR = os.environ.get("AGSYNC_ADDR", "127.0.0.1:50051")
SERVICE = "agsync.v1.SyncService"
passed = 0


def check(cond, what):
    global passed
    if not cond:
        print(f"FAILED: {what}\n{passed} passed, 1 failed")
        sys.exit(1)
    passed += 1
    print(f"ok: {what}")


def grpcurl(method, request, *flags):
    run = subprocess.run(
        ["grpcurl", "-plaintext", *flags, "-d", json.dumps(request), ADDR, f"{SERVICE}/{method}"],
        capture_output=True, text=True, timeout=30)
    return run.returncode, run.stdout, run.stderr


def call(method, request):
    code, out, err = grpcurl(method, request)
    check(code == 0, f"{method} succeeds ({err.strip()[:200]})")
    return json.loads(out)


def messages(text):
    """grpcurl prints one JSON object per stream message."""
    decoder, i, out = json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text) or text.startswith("ERROR", i):
            return out
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)


def main():
    suffix = uuid.uuid4().hex[:8]
    db, key = f"cars_grpcurl_{suffix}", f"org.example.sync.Cars.{suffix}"
    call("CreateDatabase", {"name": db, "sync_key": key})
    before = call("Put", {"database": db, "id": "mustang", "body": {"model": "Mustang"}})

    # Terminal 1: a live subscriber (bounded by -max-time so the test ends).
    sub = subprocess.Popen(
        ["grpcurl", "-plaintext", "-max-time", "15", "-d", json.dumps({"sync_keys": [key]}),
         ADDR, f"{SERVICE}/Subscribe"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = ""
    while "}\n}" not in first:  # the whole first message: "subscribed"
        line = sub.stdout.readline()
        if not line:
            check(False, f"the subscriber's first message arrives (got {first!r})")
        first += line
    check(messages(first) == [{"subscribed": {"headSeq": before["seq"]}}],
          f"first message is subscribed with the head seq: {first.strip()}")

    # Terminal 2: a write and an application notification.
    put = call("Put", {"database": db, "id": "beetle", "body": {"model": "Beetle", "year": 1963}})
    note = call("Notify", {"sync_key": key, "attributes": {"reason": "price list updated"}})
    for_alice = call("Notify", {"sync_key": key, "aliases": ["alice"]})
    last = call("Put", {"database": db, "id": "last", "body": {}})

    sub.terminate()
    rest, _ = sub.communicate(timeout=10)
    got = [m["notification"] for m in messages(rest)]
    check([n["seq"] for n in got] == [put["seq"], note["seq"], last["seq"]],
          "the subscriber got the Put, the Notify and the last Put, not alice's")
    check(got[0] == {"syncKey": key, "seq": put["seq"], "database": db, "id": "beetle", "rev": put["rev"]},
          "a write's notification names the database, id and rev")
    check(got[1] == {"syncKey": key, "seq": note["seq"], "attributes": {"reason": "price list updated"}},
          "a Notify's notification carries its attributes")

    # A client that was away, listening as alice, resumes from the seq it saw.
    code, out, _ = grpcurl("Subscribe", {"sync_keys": [key], "since": before["seq"], "alias": "alice"},
                           "-max-time", "2")
    replay = messages(out)
    check([m.get("notification", {}).get("seq") for m in replay[:-1]]
          == [put["seq"], note["seq"], for_alice["seq"], last["seq"]],
          "resume with since replays everything after it, alice's notification included")
    check(replay[-1] == {"subscribed": {"headSeq": last["seq"]}}, "then subscribed: live from here")

    # And loads the changes since its last seq.
    changes = call("Changes", {"database": db, "since": before["seq"]})
    check([c["id"] for c in changes["changes"]] == ["beetle", "last"] and changes["lastSeq"] == last["seq"],
          "Changes lists what changed since then")

    code, _, err = grpcurl("Subscribe", {"sync_keys": []})
    check(code != 0 and "InvalidArgument" in err and "at least one sync key is required" in err,
          "empty sync_keys is INVALID_ARGUMENT")
    print(f"{passed} passed, 0 failed")


if __name__ == "__main__":
    main()
