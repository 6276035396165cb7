#!/usr/bin/env bash
# Runs every benchmark of BENCHMARKS.md: each workload against agsync, etcd
# (where it has a counterpart) and the no-op server side by side, medians of
# --runs runs. Takes about 50 minutes on a 2-core machine; leave the machine
# otherwise idle. The rows with etcd are bench/etcd.sh (which installs
# Debian's etcd-server if missing, as root).
# Usage: bench/run-all.sh [output-file]   (default bench/results-<date>.log)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results-$(date +%Y%m%d-%H%M).log}
cargo build --release --locked --workspace
B=./target/release/agsync-bench
run() { echo "### agsync-bench compare $*" | tee -a "$out"; "$B" compare "$@" 2>&1 | tee -a "$out"; }
: > "$out"
bench/etcd.sh "$out"
run --runs 3 --workload replay --events 1000000 --server-arg=--retain-events=2000000
run --runs 3 --workload preload --docs 1000000
run --runs 3 --workload update --docs 1000000
run --runs 3 --workload get --docs 1000000
run --runs 1 --workload fanout --subscribers 100
run --runs 1 --workload fanout --subscribers 1000
run --runs 1 --workload fanout --subscribers 10000
echo "results in $out"
