#!/usr/bin/env bash
# The hardening benchmarks of BENCHMARKS.md ("Bounded disk and memory"):
#  1. update-64 and create-64 before/after: OLD_AGSYNC (a build of the commit
#     before the hardening, 7ddb878) against this tree's agsync, alternating,
#     3 runs each (bench/before-after.sh);
#  2. the WAL soak: 5 minutes of update-64 plus create-64, WAL sampled every
#     second, failing if it passes the 64 MiB bound;
#  3. the hostile mix, failing past 1 GiB of server RSS or a well-behaved
#     p99 over 1 s.
# Usage: bench/hardening.sh OLD_AGSYNC [output-file]
# Build OLD_AGSYNC with: git worktree add /tmp/old 7ddb878 &&
#   (cd /tmp/old && cargo build --release --bin agsync)
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1
out=${2:-bench/results-hardening-$(date +%Y%m%d-%H%M).log}
cargo build --release --locked --workspace
: > "$out"
echo "### bench/before-after.sh $old target/release/agsync 3 10 update create" | tee -a "$out"
bench/before-after.sh "$old" target/release/agsync 3 10 update create 2>&1 | tee -a "$out"
serve() { # serve DIR PORT: starts agsync on a fresh database in DIR; sets $pid
    "./target/release/agsync" --listen "127.0.0.1:$2" --db "$1/agsync.db" >"$1/server.log" 2>&1 &
    pid=$!
    sleep 1
}
dir=$(mktemp -d /tmp/agsync-hardening.XXXXXX)
serve "$dir" 50091
echo "### agsync-bench run --workload wal-soak --clients 64 --duration-secs 300 --wal-max-bytes 67108864" | tee -a "$out"
./target/release/agsync-bench run --addr 127.0.0.1:50091 --server-pid "$pid" --workload wal-soak \
    --db-file "$dir/agsync.db" --wal-max-bytes 67108864 --clients 64 --duration-secs 300 2>&1 | tee -a "$out"
kill -TERM "$pid"; wait "$pid" || true; rm -rf "$dir"
dir=$(mktemp -d /tmp/agsync-hardening.XXXXXX)
serve "$dir" 50092
echo "### agsync-bench run --workload hostile --duration-secs 60 --max-rss-mb 1024 --good-p99-ms 1000" | tee -a "$out"
./target/release/agsync-bench run --addr 127.0.0.1:50092 --server-pid "$pid" --workload hostile \
    --duration-secs 60 --max-rss-mb 1024 --good-p99-ms 1000 2>&1 | tee -a "$out"
kill -TERM "$pid"; wait "$pid" || true; rm -rf "$dir"
echo "results in $out"
