#!/usr/bin/env bash
# Where the metrics' cost shows in a profile (BENCHMARKS.md "Metrics
# overhead"): get-64 for 12 s against agsync with and without
# --metrics-listen (scraped once a second), `perf record` of the server for
# 5 s in the middle, then the share of CPU samples in the metrics crates and
# in the request layer (src/api/calls.rs). Needs perf (Debian: linux-perf).
# Usage: bench/metrics-profile.sh [dir]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --workspace
dir=${1:-$(mktemp -d /tmp/agsync-prof.XXXXXX)}
mkdir -p "$dir"
for mode in off on; do
    args=(--listen 127.0.0.1:50591 --db "$dir/$mode.db")
    if [ "$mode" = on ]; then args+=(--metrics-listen 127.0.0.1:50592); fi
    ./target/release/agsync "${args[@]}" >"$dir/server-$mode.log" 2>&1 &
    server=$!
    sleep 1
    (for _ in $(seq 1 20); do curl -s 127.0.0.1:50592/metrics >/dev/null || true; sleep 1; done) &
    scraper=$!
    ./target/release/agsync-bench run --addr 127.0.0.1:50591 --workload get --clients 64 --duration-secs 12 \
        | tail -1 >"$dir/bench-$mode.json" &
    bench=$!
    sleep 5
    perf record -F 999 -g -p "$server" -o "$dir/perf-$mode.data" -- sleep 5 >/dev/null 2>&1
    wait "$bench"
    kill "$scraper" 2>/dev/null || true
    kill -TERM "$server"; wait "$server" || true
    perf report -i "$dir/perf-$mode.data" --no-children --sort symbol -g none --stdio 2>/dev/null \
        | grep -E '^ +[0-9]' | python3 -c '
import re, sys
crates = layer = 0.0
for line in sys.stdin:
    share = float(line.split("%")[0])
    if re.search(r"metrics::|metrics_util|metrics_exporter|crossbeam_epoch", line):
        crates += share
    elif "telemetry" in line:
        layer += share
print(f"'"$mode"': metrics crates {crates:.2f}% of CPU samples, request layer {layer:.2f}%")'
done
