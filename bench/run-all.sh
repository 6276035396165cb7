#!/usr/bin/env bash
# Runs every benchmark of BENCHMARKS.md: each workload against agsync, etcd
# (where it has a counterpart) and the no-op server side by side, medians of
# --runs runs. Takes about 40 minutes on a 2-core machine; leave the machine
# otherwise idle. etcd is Debian's etcd-server, installed here if missing
# (as root) and started by the bench itself on loopback, fresh each run.
# Usage: bench/run-all.sh [output-file]   (default bench/results-<date>.log)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results-$(date +%Y%m%d-%H%M).log}
if ! command -v etcd >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "etcd is not installed: run as root, or apt-get install etcd-server first" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
fi
cargo build --release --locked
B=./target/release/agsync-bench
run() { echo "### agsync-bench compare $*" | tee -a "$out"; "$B" compare "$@" 2>&1 | tee -a "$out"; }
: > "$out"
etcd --version | head -1 | tee -a "$out"
run --runs 3 --peer etcd --workload create
run --runs 3 --peer etcd --workload update
run --runs 3 --peer etcd --workload get
run --runs 3 --peer etcd --workload contended
run --runs 3 --peer etcd --workload bulk
run --runs 3 --peer etcd --workload fanout --subscribers 5000
run --runs 3 --peer etcd --workload replay --events 1000000 --server-arg=--retain-events=2000000
run --runs 3 --workload preload --docs 1000000
run --runs 3 --workload update --docs 1000000
run --runs 3 --workload get --docs 1000000
run --runs 1 --workload fanout --subscribers 100
run --runs 1 --workload fanout --subscribers 1000
run --runs 1 --workload fanout --subscribers 10000
echo "results in $out"
