#!/usr/bin/env python3
"""Runs the README's grpcurl walkthrough exactly as written and checks that
each command prints what the README shows.

Revisions are deterministic, so they must match byte for byte; document ids
(32 hex chars) are compared as "some id", since the ones the server generates
(NewId, BulkPut items without an id) differ between runs. Needs grpcurl on PATH and a server on
127.0.0.1:50051 with an empty database.

Usage: check_readme.py README.md
"""
import re
import subprocess
import sys

# A generated id: 32 lowercase hex chars not preceded by "-" (which would make
# it a revision hash).
HEX_ID = re.compile(r'(?<![-0-9a-f])[0-9a-f]{32}(?![0-9a-f])')


def console_blocks(readme):
    """Yields (command, expected output) pairs from ```console blocks."""
    for block in re.findall(r"```console\n(.*?)```", readme, re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                raise SystemExit(f"unexpected line outside a command: {lines[i]!r}")
            cmd = lines[i][2:]
            i += 1
            # A command continues while a quote is open or the line ends in "\".
            while cmd.count("'") % 2 == 1 or cmd.endswith("\\"):
                cmd += "\n" + lines[i]
                i += 1
            out = []
            while i < len(lines) and not lines[i].startswith("$ "):
                out.append(lines[i])
                i += 1
            yield cmd, "\n".join(out)


def normalize(text):
    return HEX_ID.sub("<id>", text).strip()


def main():
    readme = open(sys.argv[1], encoding="utf-8").read()
    pairs = list(console_blocks(readme))
    failures = 0
    for cmd, expected in pairs:
        run = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30)
        got = normalize(run.stdout + run.stderr)
        want = normalize(expected)
        if got != want:
            failures += 1
            print(f"FAIL: {cmd}\n--- README shows:\n{want}\n--- got:\n{got}\n")
        else:
            print(f"ok: {cmd.splitlines()[0][:100]}")
    print(f"{len(pairs) - failures} passed, {failures} failed")
    sys.exit(1 if failures or not pairs else 0)


if __name__ == "__main__":
    main()
