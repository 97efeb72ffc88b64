#!/usr/bin/env python3
"""Check that a Grafana dashboard queries only metrics the agent exports.

Usage: python3 packaging/check_dashboard.py DASHBOARD.json METRICS.txt

DASHBOARD.json is a Grafana dashboard (packaging/grafana/lifeboat.json).
METRICS.txt is a scrape of the agent's /metrics, e.g.

    curl -s 127.0.0.1:9898/metrics > metrics.txt

Every PromQL expression in the dashboard is collected: the `expr` of every
panel target (panels nested in rows included, wherever they sit in the
document) and the queries of the template variables. Metric-like names are
taken from them: `lifeboat_...` identifiers and `up`, which Prometheus adds to
every scrape and so is never in /metrics. Each name must be declared by a
`# TYPE` line or appear as a sample in METRICS.txt. A counter's `_total`
name is accepted as written, and also when the scrape declares the family
without the suffix (OpenMetrics style); `_bucket`, `_sum`, `_count` and
`_created` are accepted for histograms and summaries declared without them.

Exits 0 when every name is known, 1 listing the unknown ones (with the
expressions that use them), 2 on a usage or input error. Standard library
only.
"""

import json
import re
import sys

# Names Prometheus itself attaches to a scrape; they never appear in /metrics.
SYNTHETIC = {"up"}

METRIC_RE = re.compile(
    r"(?<![A-Za-z0-9_:.$])(lifeboat_[A-Za-z0-9_:]*|up)(?![A-Za-z0-9_:(])"
)
# Double-, single- and back-quoted PromQL strings.
STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
NAME_MATCHER_RE = re.compile(r'__name__\s*=\s*"((?:[^"\\]|\\.)*)"')
SAMPLE_RE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{|\s)")
TYPE_RE = re.compile(r"^#\s*TYPE\s+([A-Za-z_:][A-Za-z0-9_:]*)\s+(\w+)")


def expressions(dashboard):
    """Every PromQL expression in the dashboard, as (where, expr)."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            title = node.get("title")
            if isinstance(title, str) and "gridPos" in node:
                where = "panel %r" % title
            expr = node.get("expr")
            if isinstance(expr, str) and expr.strip():
                found.append((where, expr))
            for key, value in node.items():
                if key != "templating":
                    walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    walk(dashboard, "dashboard")

    templating = dashboard.get("templating", {}) if isinstance(dashboard, dict) else {}
    for var in templating.get("list", []) or []:
        if not isinstance(var, dict) or var.get("type") not in ("query", None):
            continue
        where = "variable %r" % var.get("name", "?")
        queries = []
        query = var.get("query")
        if isinstance(query, str):
            queries.append(query)
        elif isinstance(query, dict):
            for key in ("query", "expr"):
                if isinstance(query.get(key), str):
                    queries.append(query[key])
        if isinstance(var.get("definition"), str):
            queries.append(var["definition"])
        for q in queries:
            if q.strip():
                found.append((where, q))
        # A variable could also carry targets or exprs of its own.
        for key, value in var.items():
            if key not in ("query", "definition"):
                walk(value, where)
    unique = []
    for item in found:
        if item not in unique:
            unique.append(item)
    return unique


def metric_names(expr):
    """Metric-like names used by one expression."""
    names = set(NAME_MATCHER_RE.findall(expr))
    # Label values and regexes are strings, not metric names.
    bare = STRING_RE.sub('""', expr)
    names.update(METRIC_RE.findall(bare))
    return {n for n in names if n == "up" or n.startswith("lifeboat_")}


def exported(text):
    """Names the scrape declares or has samples of, and the declared types."""
    names, types = set(), {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            m = TYPE_RE.match(line)
            if m:
                names.add(m.group(1))
                types[m.group(1)] = m.group(2).lower()
            continue
        m = SAMPLE_RE.match(line)
        if m:
            names.add(m.group(1))
    return names, types


def known(name, names, types):
    if name in SYNTHETIC or name in names:
        return True
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("_sum", "_count", "_created"),
    }
    for family, kind in types.items():
        for suffix in suffixes.get(kind, ()):
            if name == family + suffix:
                return True
    return False


def main(argv):
    if len(argv) != 3 or argv[1] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    try:
        with open(argv[1], encoding="utf-8") as f:
            dashboard = json.load(f)
        with open(argv[2], encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        print("check_dashboard: %s" % e, file=sys.stderr)
        return 2

    names, types = exported(text)
    if not any(n.startswith("lifeboat_") for n in names):
        print("check_dashboard: %s holds no lifeboat_ metric; is it a scrape of the agent's /metrics?"
              % argv[2], file=sys.stderr)
        return 2
    exprs = expressions(dashboard)
    if not exprs:
        print("check_dashboard: %s has no PromQL expression" % argv[1], file=sys.stderr)
        return 2

    used = {}
    for where, expr in exprs:
        for name in metric_names(expr):
            used.setdefault(name, []).append((where, expr))
    unknown = sorted(n for n in used if not known(n, names, types))
    if unknown:
        print("%s uses %d metric(s) that %s does not export:" % (argv[1], len(unknown), argv[2]))
        for name in unknown:
            print("  %s" % name)
            for where, expr in used[name]:
                print("      in %s: %s" % (where, expr))
        return 1
    print("%s: %d expressions, %d metrics, all exported by %s"
          % (argv[1], len(exprs), len(used), argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
