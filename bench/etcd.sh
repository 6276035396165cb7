#!/usr/bin/env bash
# The "agsync, etcd and the ceiling" section of BENCHMARKS.md: every workload
# etcd has a counterpart for, against agsync, etcd and the no-op server in one
# invocation per workload (alternating order, medians of 3 runs, 64 clients,
# default durability on both). About 30 minutes on a 2-core machine; leave it
# otherwise idle. etcd is Debian's etcd-server, installed here if missing (as
# root); the bench starts it on loopback with a fresh data dir every run.
# Usage: bench/etcd.sh [output-file]   (default bench/results-etcd-<date>.log)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results-etcd-$(date +%Y%m%d-%H%M).log}
if ! command -v etcd >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "etcd is not installed: run as root, or apt-get install etcd-server first" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
    # The bench starts its own etcd; on a host with systemd the package also
    # starts a system one, which would take CPU and memory during the runs.
    systemctl disable --now etcd >/dev/null 2>&1 || true
fi
cargo build --release --locked --workspace
B=./target/release/agsync-bench
run() { echo "### agsync-bench compare $*" | tee -a "$out"; "$B" compare "$@" 2>&1 | tee -a "$out"; }
etcd --version | sed -n 1p | tee -a "$out"
run --runs 3 --peer etcd --workload create
run --runs 3 --peer etcd --workload update
run --runs 3 --peer etcd --workload get
run --runs 3 --peer etcd --workload contended
run --runs 3 --peer etcd --workload bulk
run --runs 3 --peer etcd --workload fanout --subscribers 5000
run --runs 3 --peer etcd --workload replay --events 100000
echo "results in $out"
