#!/usr/bin/env bash
# The PostgreSQL benchmarks of BENCHMARKS.md ("PostgreSQL and several
# nodes"): every throughput workload against agsync on SQLite, one agsync
# node on PostgreSQL, two nodes on one PostgreSQL database with the clients
# split over both, and the no-op ceiling, alternating, 3 runs each; then the
# write→notification latency at 1,000 writes/s, across two nodes.
# PostgreSQL is a throwaway cluster (scripts/pg-throwaway) with fsync on.
# Usage: bench/postgres.sh [output-file]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results-postgres-$(date +%Y%m%d-%H%M).log}
cargo build --release --locked --workspace
pgdir=$(mktemp -d /tmp/agsync-pgbench.XXXXXX)
trap 'scripts/pg-throwaway stop "$pgdir"' EXIT
url=$(scripts/pg-throwaway start "$pgdir")
: > "$out"
bench() {
    echo "### agsync-bench compare --postgres URL $*" | tee -a "$out"
    ./target/release/agsync-bench compare --postgres "$url" "$@" 2>&1 | tee -a "$out"
}
for workload in update create contended get; do
    bench --runs 3 --workload "$workload" --clients 64 --duration-secs 10
done
bench --runs 3 --workload bulk --clients 16 --batch 100 --duration-secs 10
bench --runs 3 --workload cross-node --rate 1000 --clients 64 --duration-secs 20
echo "results in $out"
