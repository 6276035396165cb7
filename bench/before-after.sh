#!/usr/bin/env bash
# Throughput of two agsync binaries side by side: each workload is run
# --runs times against each binary, alternating, each on a fresh database,
# and the medians and the ratio new/old are printed.
# Usage: bench/before-after.sh OLD_AGSYNC NEW_AGSYNC [runs] [seconds] [workloads...]
# e.g.   bench/before-after.sh /tmp/old/agsync target/release/agsync 3 10 update create
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1 new=$2 runs=${3:-3} secs=${4:-10}
shift 4 || shift $#
workloads=${*:-update create}
bench=./target/release/agsync-bench
results=$(mktemp)
for workload in $workloads; do
    for run in $(seq 1 "$runs"); do
        for which in old new; do
            bin=$old; [ "$which" = new ] && bin=$new
            dir=$(mktemp -d /tmp/agsync-ab.XXXXXX)
            "$bin" --listen 127.0.0.1:50061 --db "$dir/agsync.db" >"$dir/log" 2>&1 &
            pid=$!
            for _ in $(seq 1 100); do
                if grep -q "agsync listening" "$dir/log"; then break; fi
                sleep 0.1
            done
            line=$("$bench" run --addr 127.0.0.1:50061 --server-pid "$pid" --label "$which" \
                --workload "$workload" --clients 64 --duration-secs "$secs" | tail -1)
            echo "$line" | tee -a "$results"
            kill -TERM "$pid"; wait "$pid" || true
            rm -rf "$dir"
        done
    done
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for w in sorted({r["workload"] for r in rows}):
    med = {}
    for s in ("old", "new"):
        rs = [r for r in rows if r["workload"] == w and r["server"] == s]
        med[s] = (statistics.median(r["ops_per_s"] for r in rs),
                  statistics.median(r["p99_ms"] for r in rs))
    print(f"{w}: old {med['old'][0]:.0f}/s p99 {med['old'][1]:.1f} ms | "
          f"new {med['new'][0]:.0f}/s p99 {med['new'][1]:.1f} ms | new/old {med['new'][0]/med['old'][0]:.3f}")
PY
rm -f "$results"
