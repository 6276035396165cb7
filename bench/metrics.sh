#!/usr/bin/env bash
# The cost of metrics (BENCHMARKS.md "Metrics overhead"): agsync with and
# without --metrics-listen (scraped once a second during the run) and the
# no-op ceiling, alternating, 5 runs each, 64 clients.
# Usage: bench/metrics.sh [output-file]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results-metrics-$(date +%Y%m%d-%H%M).log}
cargo build --release --locked --workspace
: > "$out"
for workload in update get; do
    echo "### agsync-bench compare --metrics --runs 5 --workload $workload --clients 64" | tee -a "$out"
    ./target/release/agsync-bench compare --metrics --runs 5 --workload "$workload" --clients 64 2>&1 | tee -a "$out"
done
echo "results in $out"
