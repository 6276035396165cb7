#!/usr/bin/env bash
# Instructions per Get with and without --metrics-listen, counted by
# callgrind (repeatable whatever else the machine does, unlike throughput):
# the server runs under valgrind, agsync-bench drives 16 clients of Gets for
# 30 s while /metrics is scraped once a second; then the instructions of the
# whole run, and of serving the scrapes, over the Gets answered.
# Usage: bench/metrics-callgrind.sh [dir]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
dir=${1:-$(mktemp -d /tmp/agsync-cg.XXXXXX)}
for mode in off on; do
    args=(--listen 127.0.0.1:50591 --db "$dir/$mode.db")
    if [ "$mode" = on ]; then args+=(--metrics-listen 127.0.0.1:50592); fi
    valgrind --tool=callgrind --callgrind-out-file="$dir/cg-$mode.out" ./target/release/agsync "${args[@]}" \
        >"$dir/server-$mode.log" 2>&1 &
    server=$!
    for _ in $(seq 1 120); do
        if grpcurl -plaintext -max-time 1 127.0.0.1:50591 grpc.health.v1.Health/Check >/dev/null 2>&1; then break; fi
        sleep 0.5
    done
    (for _ in $(seq 1 40); do curl -s 127.0.0.1:50592/metrics >/dev/null || true; sleep 1; done) &
    scraper=$!
    ./target/release/agsync-bench run --addr 127.0.0.1:50591 --workload get --clients 16 --duration-secs 30 \
        | tail -1 >"$dir/bench-$mode.json"
    kill "$scraper" 2>/dev/null || true
    kill -TERM "$server"; wait "$server" || true
    # awk reads to the end (grep -m1 would break the pipe under pipefail).
    total=$(callgrind_annotate "$dir/cg-$mode.out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !f {gsub(",", "", $1); print $1; f=1}')
    scrapes=$(callgrind_annotate --inclusive=yes "$dir/cg-$mode.out" 2>/dev/null \
        | awk '/telemetry::serve::\{\{closure\}\}::\{\{closure\}\}/ && !f {gsub(",", "", $1); print $1; f=1}')
    ops=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['ops'])" "$dir/bench-$mode.json")
    echo "$mode: $ops Gets, $((total / ops)) instructions per Get; without serving /metrics: $(((total - ${scrapes:-0}) / ops))"
done
