#!/usr/bin/env bash
# Bootstrap of a large database (issue 24, item 2): how fast a fresh client
# loads N documents of ~1 KB with paged Changes (include_docs, from since=0)
# or with a Snapshot stream (json_bodies, then Changes from its seq), what it
# costs the server in memory, and what it does to another client's small
# writes.
#
#   bench/bootstrap/run.sh                          # 1,000,000 documents, 3 runs per client
#   BOOTSTRAP_DOCS=100000 bench/bootstrap/run.sh    # a quick one
#
# Environment (defaults in brackets):
#   BOOTSTRAP_DOCS [1000000]      documents to load
#   BOOTSTRAP_RUNS [3]            runs per client, interleaved (run 1 of each client, then run 2, ...)
#   BOOTSTRAP_CLIENTS ["python node-grpc node-grpc-web"]
#                                 paged Changes from 0: python: load.py (grpcio); node-grpc:
#                                 SyncClient (snapshot: false) on connect-node's gRPC transport
#                                 (HTTP/2); node-grpc-web: SyncClient (snapshot: false) on the
#                                 library's createAgsyncTransport (gRPC-Web over Node's fetch,
#                                 HTTP/1.1).
#                                 The Snapshot RPC: python-snapshot: load.py --snapshot (json_bodies,
#                                 each body json.loads'ed, then Changes from the snapshot's seq);
#                                 node-grpc-snapshot, node-grpc-web-snapshot: SyncClient's default
#                                 (Snapshot with JSON bodies, then Changes) on those transports.
#                                 All six: "python python-snapshot node-grpc node-grpc-snapshot
#                                 node-grpc-web node-grpc-web-snapshot"
#   BOOTSTRAP_LIMIT [10000]       the loaders' Changes page size (the server's maximum); a Snapshot's
#                                 messages are the server's (about 1 MiB)
#   BOOTSTRAP_MAX_RESPONSE_BYTES [4194304]  the server's --max-response-bytes; the Python
#                                 loader's receive limit is raised to match
#   BOOTSTRAP_IDLE_SECS [10]      length of the writer's idle measurement before each run
#   BOOTSTRAP_PORT [41234]        the server listens on 127.0.0.1:PORT
#   BOOTSTRAP_LOADER_NICE [0]     the loader's nice value: 10 lets the server and the writer go first,
#                                 as if the loader ran on another machine (the writer's p99 then
#                                 shows what the server's own work costs it)
#   BOOTSTRAP_NODE_WINDOW [0]     node-grpc*: the HTTP/2 stream window Node advertises, in bytes
#                                 (0: Node's 64 KiB); passed to connect-node's nodeOptions.settings
#   BOOTSTRAP_PROFILE [0]         1: after the runs, one profiled run per client (cProfile,
#                                 V8 CPU profile) and, with `perf` usable, the server's hot spots
#                                 (BOOTSTRAP_RUNS=0 BOOTSTRAP_PROFILE=1: the profiles alone)
#   BOOTSTRAP_RETRIES [2]         times a run is repeated when another process took CPU during it
#   AGSYNC_BIN [target/release/agsync]
#
# Steps: copy the server binary into a temp dir (a rebuild during the run
# cannot swap it), start it on a fresh SQLite file there, fill the database
# with fill.py (BulkPuts of 1000), restart the server on the same file (so
# the first run meets a server whose memory the fill did not warm; later
# runs meet a warm one), then for each run: wait until the machine is
# quiet, the writer alone for BOOTSTRAP_IDLE_SECS (idle p50/p99), then the
# writer in the background while one loader reads everything, the server's
# VmRSS sampled every 100 ms. One line per run (others_pct and
# idle_busy_pct show whether another process competed for the CPU; such a
# run is repeated), then the medians per client. Needs python3 with
# grpcio and grpcio-tools (examples/python/requirements.txt) and, for the
# Node clients, clients/web built (npm ci && npm run build). About 5 minutes
# for 1,000,000 documents on a quiet 2-core machine.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
docs=${BOOTSTRAP_DOCS:-1000000}
runs=${BOOTSTRAP_RUNS:-3}
clients=${BOOTSTRAP_CLIENTS:-python node-grpc node-grpc-web}
limit=${BOOTSTRAP_LIMIT:-10000}
max_response=${BOOTSTRAP_MAX_RESPONSE_BYTES:-4194304}
idle_secs=${BOOTSTRAP_IDLE_SECS:-10}
port=${BOOTSTRAP_PORT:-41234}
profile=${BOOTSTRAP_PROFILE:-0}
loader_nice=${BOOTSTRAP_LOADER_NICE:-0}
bin=${AGSYNC_BIN:-$root/target/release/agsync}
addr=127.0.0.1:$port

for c in $clients; do
    case $c in
        python | node-grpc | node-grpc-web | python-snapshot | node-grpc-snapshot | node-grpc-web-snapshot) ;;
        *) echo "run.sh: unknown client '$c' in BOOTSTRAP_CLIENTS" >&2; exit 2 ;;
    esac
    if [[ $c == node-* && ! -f $root/clients/web/dist/index.js ]]; then
        echo "run.sh: build clients/web first (cd clients/web && npm ci && npm run build)" >&2; exit 2
    fi
done
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "run.sh: something already listens on $addr; set BOOTSTRAP_PORT" >&2; exit 2
fi

dir=$(mktemp -d /tmp/agsync-bootstrap.XXXXXX)
server_pid="" writer_pid="" sampler_pid="" perf_pid=""
cleanup() {
    for p in $perf_pid $sampler_pid $writer_pid $server_pid; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in $perf_pid $sampler_pid $writer_pid $server_pid; do
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$dir"
}
trap cleanup EXIT
cp "$bin" "$dir/agsync"
export AGSYNC_STUBS_DIR=$dir/stubs   # the Python stubs, generated once by fill.py

start_server() {
    "$dir/agsync" --listen "$addr" --db "$dir/agsync.db" --max-response-bytes "$max_response" \
        --cors-allow-origin '*' >>"$dir/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return; fi
        kill -0 "$server_pid" 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "run.sh: the server did not listen on $addr within 10 s" >&2; exit 1
}

stop_server() {
    kill -TERM "$server_pid"
    wait "$server_pid" || true
    server_pid=""
}

# load CLIENT [--profile FILE]: runs one loader, printing its result line.
load() {
    local client=$1; shift
    case $client in
        python) timeout 900 nice -n "$loader_nice" python3 "$here/load.py" --addr "$addr" --expect "$docs" --limit "$limit" \
                    --max-receive-bytes "$max_response" "$@" ;;
        python-snapshot) timeout 900 nice -n "$loader_nice" python3 "$here/load.py" --addr "$addr" --expect "$docs" --limit "$limit" \
                    --max-receive-bytes "$max_response" --snapshot "$@" ;;
        node-grpc) timeout 900 nice -n "$loader_nice" node "$here/load.mjs" --addr "$addr" --expect "$docs" --limit "$limit" \
                    --transport grpc --mode paged "$@" ;;
        node-grpc-snapshot) timeout 900 nice -n "$loader_nice" node "$here/load.mjs" --addr "$addr" --expect "$docs" --limit "$limit" \
                    --transport grpc --mode snapshot "$@" ;;
        node-grpc-web) timeout 900 nice -n "$loader_nice" node "$here/load.mjs" --addr "$addr" --expect "$docs" --limit "$limit" \
                    --transport grpc-web --mode paged "$@" ;;
        node-grpc-web-snapshot) timeout 900 nice -n "$loader_nice" node "$here/load.mjs" --addr "$addr" --expect "$docs" --limit "$limit" \
                    --transport grpc-web --mode snapshot "$@" ;;
    esac
}

echo "# bootstrap: docs=$docs runs=$runs clients='$clients' limit=$limit max_response_bytes=$max_response loader_nice=$loader_nice" \
     "server=$("$dir/agsync" --version) (sha256 $(sha256sum "$dir/agsync" | cut -c1-12)) $(nproc) cores, $(date -u +%FT%TZ)"
start_server
python3 "$here/fill.py" --addr "$addr" --docs "$docs"
echo "# database file: $(du -m "$dir/agsync.db" | cut -f1) MB"
stop_server
start_server

# The machine's busy and total CPU ticks so far, for busy_since, which
# prints the busy CPU since then in sample.py's unit (100 = one core).
busy_ticks() {
    local _cpu user nice system idle iowait irq softirq steal _rest
    read -r _cpu user nice system idle iowait irq softirq steal _rest </proc/stat
    echo "$((user + nice + system + irq + softirq + steal)) $((user + nice + system + idle + iowait + irq + softirq + steal))"
}
busy_since() { # busy_since "$(busy_ticks)"
    local b0 t0 b1 t1
    read -r b0 t0 <<<"$1"
    read -r b1 t1 < <(busy_ticks)
    echo $(( (b1 - b0) * 100 * $(nproc) / (t1 - t0 > 0 ? t1 - t0 : 1) ))
}

# Waits (up to 5 minutes) for 2 s in which other processes use under 20% of
# a core: on a shared machine, a compiler in the background halves the
# numbers.
wait_quiet() {
    local t
    for _ in $(seq 150); do
        t=$(busy_ticks); sleep 2
        (( $(busy_since "$t") < 20 )) && return
    done
    echo "# the machine stayed busy for 5 minutes; running anyway" >&2
}

# one_run RUN CLIENT: the writer alone, then the writer during one load;
# sets $line to the run's line (in this shell, so the trap sees the pids).
one_run() {
    local run=$1 client=$2 t idle idle_busy loaded
    t=$(busy_ticks)
    idle=$(python3 "$here/writer.py" --addr "$addr" --label idle --seconds "$idle_secs")
    idle_busy=$(busy_since "$t")
    rm -f "$dir/writer.ready"
    python3 "$here/writer.py" --addr "$addr" --label load --seconds 900 \
        --ready-file "$dir/writer.ready" >"$dir/writer.out" &
    writer_pid=$!
    for _ in $(seq 100); do [[ -f $dir/writer.ready ]] && break; sleep 0.1; done
    python3 "$here/sample.py" --pid "$server_pid" >"$dir/sample.out" &
    sampler_pid=$!
    loaded=$(load "$client")
    kill -TERM "$sampler_pid" "$writer_pid"
    wait "$sampler_pid" "$writer_pid"
    sampler_pid="" writer_pid=""
    line="run=$run $loaded $(cat "$dir/sample.out")"
    line+=" idle_$(sed -n 's/.* \(p50_ms=[^ ]*\) \(p99_ms=[^ ]*\) .*/\1 idle_\2/p' <<<"$idle")"
    line+=" load_$(sed -n 's/.* \(p50_ms=[^ ]*\) \(p99_ms=[^ ]*\) .*/\1 load_\2/p' <"$dir/writer.out")"
    line+=" load_puts=$(sed -n 's/.* puts=\([0-9]*\) errors=\([0-9]*\).*/\1 write_errors=\2/p' <"$dir/writer.out")"
    # CPU taken by everything but the server and the loader during the load
    # (the writer and the sampler take ~10%), and the whole machine's during
    # the idle measurement (the writer and the server: ~15%). High values
    # mean another process competed.
    line+=" $(awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                    printf "others_pct=%.0f", v["sys_busy_pct"] - v["cpu_pct"] - 100 * v["cpu_s"] / v["secs"] }' <<<"$line")"
    line+=" idle_busy_pct=$idle_busy"
}

# A run during which another process took CPU (others_pct > 25, or the idle
# phase's machine over 40%) is printed as a comment and repeated, at most
# BOOTSTRAP_RETRIES times; the last attempt counts whatever it met.
retries=${BOOTSTRAP_RETRIES:-2}
results=$dir/results
: >"$results"
for run in $(seq "$runs"); do
    for client in $clients; do
        for attempt in $(seq 0 "$retries"); do
            wait_quiet
            one_run "$run" "$client"
            if (( attempt < retries )) && awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                    exit !(v["others_pct"] > 25 || v["idle_busy_pct"] > 40) }' <<<"$line"; then
                echo "# contended, repeated: $line"
                continue
            fi
            echo "$line" | tee -a "$results"
            break
        done
    done
done

# The medians per client, and the ratios the targets are stated in.
python3 - "$results" <<'EOF'
import statistics, sys
rows = [dict(kv.split("=", 1) for kv in line.split()) for line in open(sys.argv[1]) if line.strip()]
if not rows:
    sys.exit(0)
med = lambda xs: statistics.median(float(x) for x in xs)
print("# medians: client docs/s secs server_rss_growth_mb(peak-before, max over runs) server_cpu_pct"
      " writer_p50/p99_ms idle -> load (p99 ratio)")
for client in dict.fromkeys(r["client"] for r in rows):
    rs = [r for r in rows if r["client"] == client]
    growth = max(int(r["rss_mb"].split("/")[1]) - int(r["rss_mb"].split("/")[0]) for r in rs)
    anon = max(int(r["anon_mb"].split("/")[1]) - int(r["anon_mb"].split("/")[0]) for r in rs)
    ip50, ip99 = med(r["idle_p50_ms"] for r in rs), med(r["idle_p99_ms"] for r in rs)
    lp50, lp99 = med(r["load_p50_ms"] for r in rs), med(r["load_p99_ms"] for r in rs)
    print(f"median client={client} runs={len(rs)} docs_per_s={med(r['docs_per_s'] for r in rs):.0f} "
          f"secs={med(r['secs'] for r in rs):.2f} docs_per_page={med(r['docs_per_page'] for r in rs):.0f} "
          f"ms_per_page={med(r['ms_per_page'] for r in rs):.1f} "
          f"rss_growth_mb_max={growth} anon_growth_mb_max={anon} "
          f"server_cpu_pct={med(r['cpu_pct'] for r in rs):.0f} sys_busy_pct={med(r['sys_busy_pct'] for r in rs):.0f} "
          f"writer_idle_p50/p99_ms={ip50:.2f}/{ip99:.2f} writer_load_p50/p99_ms={lp50:.2f}/{lp99:.2f} "
          f"p99_ratio={lp99 / ip99:.2f} others_pct={med(r['others_pct'] for r in rs):.0f}"
          f"{'' if all(float(r['others_pct']) <= 25 for r in rs) else ' (another process competed for CPU in some runs: others_pct > 25)'}")
EOF

# The voluntary and involuntary context switches of all of PID's threads.
context_switches() {
    cat /proc/"$1"/task/*/status | awk '/ctxt_switches/ { n += $2 } END { print n }'
}

if [[ $profile == 1 ]]; then
    for client in $clients; do
        wait_quiet
        echo "# profile: $client"
        case $client in
            python | python-snapshot)
                perf_ok=0
                if command -v perf >/dev/null && perf record -q -o "$dir/perf.data" -F 499 \
                        -p "$server_pid" -- sleep 0.1 >/dev/null 2>&1; then
                    perf_ok=1
                    perf record -q -o "$dir/perf.data" -F 999 -p "$server_pid" >/dev/null 2>&1 &
                    perf_pid=$!
                fi
                switches0=$(context_switches "$server_pid")
                load "$client" --profile "$dir/load.prof"
                echo "# server context switches during the load: $(( $(context_switches "$server_pid") - switches0 ))"
                python3 -c 'import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats("tottime").print_stats(10)' \
                    "$dir/load.prof" | sed -n '/ncalls/,/^$/p'
                if [[ $perf_ok == 1 ]]; then
                    kill -INT "$perf_pid"; wait "$perf_pid" || true
                    perf_pid=""
                    echo "# server CPU by thread and by code during the $client load (perf, self time)"
                    for sort in comm dso symbol; do
                        perf report -i "$dir/perf.data" --no-children --sort "$sort" --stdio 2>/dev/null \
                            | grep -E '^ +[0-9.]+%' | sed -e 's/[ -]*$//' -n -e '1,20p'
                    done
                fi
                ;;
            node-*) load "$client" --profile "$dir/$client.cpuprofile" ;;
        esac
    done
fi
