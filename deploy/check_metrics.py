#!/usr/bin/env python3
"""Check agsync's Prometheus metrics against the Grafana dashboard and the README.

    python3 deploy/check_metrics.py --dashboard deploy/grafana/agsync-dashboard.json \
        [--readme README.md] URL [URL ...]

Each URL is a running node's metrics page (http://ADDR/metrics, as served with
`--metrics-listen ADDR`; file:// URLs work too). Every page is parsed with
prometheus_client's text parser, and also checked for what that parser lets
through: every family has HELP and TYPE, once; no series appears twice;
counters are named ..._total; histograms are consistent (an le="+Inf" bucket
equal to _count, non-decreasing buckets, a _sum); grpc_code values are gRPC
code names; the page ends with a newline.

Then every metric name that a PromQL expression of the dashboard refers to
(panel and annotation `expr`s, and the templating queries) must be served by
at least one of the URLs: a SQLite node does not serve the PostgreSQL pool's
gauge, so pass one of each to cover everything.

With --readme, the metric names in the first column of the markdown table
between `<!-- metrics-table:start -->` and `<!-- metrics-table:end -->` must
be exactly the names served (union over the URLs): histograms without
_bucket/_sum/_count, counters with _total.

Exits 0 with a one-line summary when everything holds, 1 with the problems
listed otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # pragma: no cover - a setup problem, said plainly
    sys.exit("check_metrics: prometheus_client is missing: "
             "python3 -m pip install -r deploy/requirements.txt")

GRPC_CODES = {
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
    "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
    "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
}
TABLE_START = "<!-- metrics-table:start -->"
TABLE_END = "<!-- metrics-table:end -->"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


class CheckFailed(Exception):
    pass


# --------------------------------------------------------------------------- fetching and parsing

def fetch(url: str, timeout: float) -> str:
    req = urllib.request.Request(url, headers={"Accept": "text/plain; version=0.0.4"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status = getattr(resp, "status", None)
            if status is not None and status != 200:
                raise CheckFailed(f"{url}: HTTP {status}")
            raw = resp.read()
    except urllib.error.HTTPError as e:
        raise CheckFailed(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CheckFailed(f"{url}: cannot fetch: {reason}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckFailed(f"{url}: not UTF-8: {e}") from None


@dataclass
class Page:
    url: str
    # Names as a query refers to them: every sample name (counters with
    # _total, histograms with _bucket/_sum/_count), plus the family names
    # declared by TYPE lines (so a declared family without samples still
    # counts as served, as it does for Prometheus' metadata).
    sample_names: set[str] = field(default_factory=set)
    # Names as the README table lists them: histograms bare, counters with _total.
    table_names: set[str] = field(default_factory=set)
    families: int = 0
    samples: int = 0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _raw_declarations(text: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Names of the HELP and TYPE lines, as written, with their line numbers."""
    helps: dict[str, list[str]] = defaultdict(list)
    types: dict[str, list[str]] = defaultdict(list)
    for n, line in enumerate(text.split("\n"), 1):
        parts = line.strip().split(None, 3)
        if len(parts) >= 3 and parts[0] == "#" and parts[1] in ("HELP", "TYPE"):
            (helps if parts[1] == "HELP" else types)[parts[2]].append(
                f"{n}:{parts[3] if len(parts) > 3 else ''}")
    return helps, types


def _first_bad_line(text: str) -> tuple[int, str]:
    """The first line at which the parser fails (0 if no prefix fails)."""
    lines = text.split("\n")

    def fails(k: int) -> bool:
        try:
            list(text_string_to_metric_families("\n".join(lines[:k]) + "\n"))
            return False
        except Exception:
            return True

    if not fails(len(lines)):
        return 0, ""
    lo, hi = 0, len(lines)  # fails(lo) is False, fails(hi) is True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid
    return hi, lines[hi - 1]


def _le(value: str) -> float:
    return math.inf if value in ("+Inf", "Inf", "inf") else float(value)


def check_page(url: str, text: str) -> Page:
    page = Page(url)
    err = page.errors.append

    if not text.strip():
        err("the page is empty")
        return page
    if not text.endswith("\n"):
        err("the page does not end with a newline (the text format requires one after the last line)")
    if "\r" in text:
        err("the page has carriage returns (lines must end with \\n alone)")

    helps, types = _raw_declarations(text)
    for kind, decl in (("HELP", helps), ("TYPE", types)):
        for name, lines in decl.items():
            if len(lines) > 1:
                err(f"{name}: {len(lines)} {kind} lines (lines {', '.join(l.split(':')[0] for l in lines)})")
    for name, lines in types.items():
        typ = lines[0].split(":", 1)[1].strip()
        if typ == "counter" and not name.endswith("_total"):
            err(f"{name}: a counter whose name does not end in _total "
                f"(the parser would report its samples as {name}_total, which Prometheus would not store)")

    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError, often bare: find the line
        detail = str(e) or type(e).__name__
        line_no, line = _first_bad_line(text)
        where = f" at line {line_no}: {line!r}" if line_no else ""
        raise CheckFailed(f"{url}: not valid Prometheus text format{where} ({detail})") from None

    seen_families: Counter[str] = Counter()
    series: Counter[tuple] = Counter()
    for fam in families:
        page.families += 1
        seen_families[(fam.name, fam.type)] += 1
        declared = fam.name + "_total" if fam.type == "counter" else fam.name
        if fam.type in ("untyped", "unknown") and fam.name not in types:
            sample_list = ", ".join(sorted({s.name for s in fam.samples})) or fam.name
            err(f"{sample_list}: no TYPE line before its samples")
        if not fam.documentation.strip():
            err(f"{declared}: no HELP text")
        if fam.type in ("counter", "gauge", "histogram", "summary") and not fam.samples:
            page.notes.append(f"{declared}: declared but has no samples")
        page.table_names.add(declared)
        if fam.type == "histogram":
            page.sample_names.update(fam.name + s for s in HISTOGRAM_SUFFIXES)
        elif fam.type == "summary":
            page.sample_names.update([fam.name, fam.name + "_sum", fam.name + "_count"])
        else:
            page.sample_names.add(declared)

        hist: dict[tuple, dict] = defaultdict(lambda: {"buckets": [], "sum": None, "count": None})
        for s in fam.samples:
            page.samples += 1
            page.sample_names.add(s.name)
            key = (s.name, tuple(sorted(s.labels.items())))
            series[key] += 1
            if fam.type == "counter" and (math.isnan(s.value) or s.value < 0):
                err(f"{s.name}{_fmt_labels(s.labels)}: counter value {s.value}")
            code = s.labels.get("grpc_code")
            if code is not None and code not in GRPC_CODES:
                err(f"{s.name}{_fmt_labels(s.labels)}: grpc_code {code!r} is not a gRPC code name")
            if fam.type == "histogram":
                labels = {k: v for k, v in s.labels.items() if k != "le"}
                h = hist[tuple(sorted(labels.items()))]
                if s.name == fam.name + "_bucket":
                    if "le" not in s.labels:
                        err(f"{s.name}{_fmt_labels(s.labels)}: a bucket without le")
                        continue
                    try:
                        h["buckets"].append((_le(s.labels["le"]), s.value))
                    except ValueError:
                        err(f"{s.name}{_fmt_labels(s.labels)}: le is not a number")
                elif s.name == fam.name + "_sum":
                    h["sum"] = s.value
                elif s.name == fam.name + "_count":
                    h["count"] = s.value
        for labels, h in hist.items():
            where = f"{fam.name}{_fmt_labels(dict(labels))}"
            buckets = sorted(h["buckets"])
            if not buckets or buckets[-1][0] != math.inf:
                err(f"{where}: no le=\"+Inf\" bucket")
            for (le_a, a), (le_b, b) in zip(buckets, buckets[1:]):
                if b < a:
                    err(f"{where}: bucket le={le_b} ({b}) is less than bucket le={le_a} ({a})")
            if h["count"] is None:
                err(f"{where}: no _count")
            elif buckets and buckets[-1][0] == math.inf and buckets[-1][1] != h["count"]:
                err(f"{where}: _count {h['count']} differs from the +Inf bucket {buckets[-1][1]}")
            if h["sum"] is None:
                err(f"{where}: no _sum")

    for (name, typ), n in seen_families.items():
        if n > 1:
            err(f"{name} ({typ}): the family appears {n} times (its lines are not together)")
    for (name, labels), n in series.items():
        if n > 1:
            err(f"{name}{_fmt_labels(dict(labels))}: the same series appears {n} times")
    return page


def _fmt_labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


# --------------------------------------------------------------------------- PromQL names

# Words that are PromQL syntax, never metric names, when they stand where a
# metric name could.
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "atan2", "inf", "nan",
}
AGGREGATORS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[^\]]*\]\]")
NAME_MATCHER = re.compile(r'__name__\s*=\s*"((?:[^"\\]|\\.)*)"')


def _strip_strings(expr: str) -> tuple[str, list[str]]:
    """Replaces string literals by "" and returns them (for __name__ matchers)."""
    out, strings, i = [], [], 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            j = i + 1
            while j < len(expr) and expr[j] != c:
                j += 2 if expr[j] == "\\" and c != "`" else 1
            strings.append(expr[i + 1:j])
            out.append('""')
            i = j + 1
        elif c == "#":  # a comment runs to the end of the line
            while i < len(expr) and expr[i] != "\n":
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out), strings


def _strip_brackets(expr: str, open_c: str, close_c: str) -> str:
    out, depth = [], 0
    for c in expr:
        if c == open_c:
            depth += 1
            out.append(" ")
        elif c == close_c and depth:
            depth -= 1
            out.append(" ")
        elif depth:
            out.append(" ")
        else:
            out.append(c)
    return "".join(out)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (by name, or by an exact __name__ matcher)."""
    names = set(NAME_MATCHER.findall(expr))
    expr = GRAFANA_VAR.sub(" 1 ", expr)  # a variable stands for a value, a duration or a regex
    expr, _ = _strip_strings(expr)
    expr = _strip_brackets(expr, "{", "}")  # label matchers
    expr = _strip_brackets(expr, "[", "]")  # ranges and subqueries
    tokens = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*|[0-9][0-9A-Za-z_.]*|\S", expr)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if not IDENT.fullmatch(tok):
            i += 1
            continue
        low = tok.lower()
        if low in LABEL_LIST_KEYWORDS:
            i += 1
            if i < len(tokens) and tokens[i] == "(":  # skip the label list
                while i < len(tokens) and tokens[i] != ")":
                    i += 1
            continue
        if nxt == "(" or low in PROMQL_KEYWORDS:
            i += 1  # a function, or syntax
            continue
        if low in AGGREGATORS and nxt.lower() in ("by", "without"):
            i += 1
            continue
        names.add(tok)
        i += 1
    return names


def templating_query_names(query: str) -> set[str]:
    """Names in a Grafana Prometheus variable query (label_values(...), query_result(...), ...)."""
    q = query.strip()
    m = re.fullmatch(r"label_values\s*\((.*)\)", q, re.S)
    if m:
        args = m.group(1)
        # label_values(label) or label_values(selector, label): the last
        # top-level argument is a label name, not a metric.
        depth, cut = 0, -1
        for k, c in enumerate(args):
            if c in "({[":
                depth += 1
            elif c in ")}]":
                depth -= 1
            elif c == "," and depth == 0:
                cut = k
        return promql_metric_names(args[:cut]) if cut >= 0 else set()
    m = re.fullmatch(r"query_result\s*\((.*)\)", q, re.S)
    if m:
        return promql_metric_names(m.group(1))
    if re.fullmatch(r"(metrics|label_names)\s*\(.*\)", q, re.S):
        return set()  # a regex over names, or label names: nothing to check
    return promql_metric_names(q)


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every expression of the dashboard."""
    found: list[tuple[str, str]] = []

    def walk(node, where):
        if isinstance(node, dict):
            title = node.get("title")
            here = f"{where} / {title}" if isinstance(title, str) and title else where
            for key, value in node.items():
                if key == "expr" and isinstance(value, str) and value.strip():
                    ref = node.get("refId", "")
                    found.append((f"{here}{' ' + ref if ref else ''}", value))
                elif key != "templating":
                    walk(value, here)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for key, value in dashboard.items():
        if key not in ("templating", "__inputs", "__requires", "__elements"):
            walk(value, key)
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        if isinstance(q, dict):
            q = q.get("query") or q.get("expr") or ""
        if not isinstance(q, str) or not q.strip():
            q = var.get("definition", "")
        if isinstance(q, str) and q.strip():
            found.append((f"variable ${var.get('name', '?')}", "\x00templating\x00" + q))
    return found


def expression_names(expr: str) -> set[str]:
    if expr.startswith("\x00templating\x00"):
        return templating_query_names(expr[len("\x00templating\x00"):])
    return promql_metric_names(expr)


# --------------------------------------------------------------------------- README table

def readme_table_names(path: str) -> list[str]:
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise CheckFailed(f"{path}: {e.strerror}") from None
    lines = text.splitlines()
    starts = [i for i, l in enumerate(lines) if l.strip() == TABLE_START]
    ends = [i for i, l in enumerate(lines) if l.strip() == TABLE_END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise CheckFailed(f"{path}: expected one line {TABLE_START} and, after it, one line {TABLE_END} "
                          f"(found {len(starts)} and {len(ends)})")
    rows = [l.strip() for l in lines[starts[0] + 1:ends[0]] if l.strip().startswith("|")]
    if len(rows) < 3:
        raise CheckFailed(f"{path}: no table rows between the metrics-table markers")
    names = []
    for n, row in enumerate(rows[2:], 3):  # rows[0] is the header, rows[1] the |---| line
        first = row.strip("|").split("|")[0]
        m = re.search(r"`([^`]+)`", first)
        if not m:
            raise CheckFailed(f"{path}: metrics table row {n} has no `metric_name` in its first column: {row}")
        names.append(m.group(1).strip())
    return names


# --------------------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dashboard", required=True, help="the Grafana dashboard JSON")
    ap.add_argument("--readme", help="a markdown file with the metrics table between the markers")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per fetch (default 10)")
    ap.add_argument("urls", nargs="+", metavar="URL", help="metrics pages (http://ADDR/metrics)")
    args = ap.parse_args(argv)

    problems: list[str] = []
    pages: list[Page] = []
    for url in args.urls:
        try:
            page = check_page(url, fetch(url, args.timeout))
        except CheckFailed as e:
            problems.append(str(e))
            continue
        pages.append(page)
        problems.extend(f"{url}: {e}" for e in page.errors)
        for note in page.notes:
            print(f"check_metrics: note: {url}: {note}", file=sys.stderr)

    served_samples = set().union(*(p.sample_names for p in pages)) if pages else set()
    served_table = set().union(*(p.table_names for p in pages)) if pages else set()

    try:
        dashboard = json.load(open(args.dashboard, encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems.append(f"{args.dashboard}: cannot read the dashboard: {e}")
        dashboard = None
    referenced: dict[str, list[str]] = defaultdict(list)
    n_exprs = 0
    if dashboard is not None:
        exprs = dashboard_expressions(dashboard)
        n_exprs = len(exprs)
        if not exprs:
            problems.append(f"{args.dashboard}: no PromQL expressions found")
        for where, expr in exprs:
            names = expression_names(expr)
            if not names:
                problems.append(f"{args.dashboard}: {where}: no metric name in {expr!r}")
            for name in names:
                referenced[name].append(where)
        if pages:
            missing = sorted(set(referenced) - served_samples)
            if missing:
                detail = "; ".join(f"{m} (in {', '.join(sorted(set(referenced[m]))[:3])})" for m in missing)
                problems.append(f"the dashboard uses {len(missing)} metric name(s) that no URL serves: {detail}")

    n_table = 0
    if args.readme:
        try:
            table = readme_table_names(args.readme)
        except CheckFailed as e:
            problems.append(str(e))
        else:
            n_table = len(table)
            dups = sorted(n for n, c in Counter(table).items() if c > 1)
            if dups:
                problems.append(f"{args.readme}: metrics table lists more than once: {', '.join(dups)}")
            if pages:
                only_table = sorted(set(table) - served_table)
                only_served = sorted(served_table - set(table))
                if only_table:
                    problems.append(f"{args.readme}: metrics table lists names no URL serves: {', '.join(only_table)}")
                if only_served:
                    problems.append(f"{args.readme}: metrics table lacks served names: {', '.join(only_served)}")

    if problems:
        print(f"check_metrics: FAILED ({len(problems)} problem(s)):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    summary = (f"check_metrics: OK: {len(pages)} page(s), {sum(p.families for p in pages)} families, "
               f"{sum(p.samples for p in pages)} samples, {len(served_table)} metrics served; "
               f"dashboard: {n_exprs} expressions, {len(referenced)} metric names, all served")
    if args.readme:
        summary += f"; README table: {n_table} names, matches"
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
