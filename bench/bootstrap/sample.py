#!/usr/bin/env python3
"""Samples a process's memory and CPU every --interval (0.1 s) until SIGTERM
(or --seconds), then prints one line:

    rss_mb=BEFORE/PEAK/AFTER anon_mb=BEFORE/PEAK/AFTER cpu_pct=P sys_busy_pct=B

VmRSS, and RssAnon (heap: what the process really holds; VmRSS also
counts the pages of the SQLite file it maps, which the kernel can drop) from
/proc/PID/status; the first sample is BEFORE, the last AFTER. cpu_pct is the
process's CPU time over the wall time (100 = one core); sys_busy_pct is the
whole machine's (200 = both cores of a 2-core machine), so the CPU other
processes took is sys_busy_pct minus this process and the client.
"""
import argparse
import os
import signal
import time


def status_kb(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(rest.split()[0])
    return out


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


def sys_busy_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v[:8]) - idle


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--seconds", type=float, default=900, help="stop after this long at the latest")
    args = ap.parse_args()

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))

    hz = os.sysconf("SC_CLK_TCK")
    t0, c0, s0 = time.monotonic(), cpu_ticks(args.pid), sys_busy_ticks()
    rss, anon = [], []
    deadline = t0 + args.seconds
    while True:
        try:
            s = status_kb(args.pid)
        except FileNotFoundError:
            break
        rss.append(s["VmRSS"])
        anon.append(s["RssAnon"])
        if stop["now"] or time.monotonic() >= deadline:
            break
        time.sleep(args.interval)
    wall = time.monotonic() - t0
    try:
        cpu = (cpu_ticks(args.pid) - c0) / hz
    except FileNotFoundError:
        cpu = float("nan")
    busy = (sys_busy_ticks() - s0) / hz
    mb = lambda kb: f"{kb / 1024:.0f}"  # noqa: E731
    print(f"rss_mb={mb(rss[0])}/{mb(max(rss))}/{mb(rss[-1])} "
          f"anon_mb={mb(anon[0])}/{mb(max(anon))}/{mb(anon[-1])} "
          f"cpu_pct={100 * cpu / wall:.0f} sys_busy_pct={100 * busy / wall:.0f} samples={len(rss)}",
          flush=True)


if __name__ == "__main__":
    main()
