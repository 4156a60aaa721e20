#!/usr/bin/env python3
"""Checks that every query of the Grafana dashboard returns data from a Prometheus.

Runs each PromQL expression of deploy/grafana/meshchat-dashboard.json (panel targets and the
template variables' label_values queries) against the Prometheus HTTP API over a time range,
with Grafana's variables substituted (an instant query at the window's end for the targets
Grafana runs as instant queries: the stat panels), and prints one line per query: panel, refId, series
returned, series with at least one value that is a number (histogram_quantile over a window
without observations gives NaN: Grafana draws nothing for it), and the expression. Exits 1
if any query has no series with a number in it, 2 on a usage or connection error.

    deploy/prometheus/check-dashboard.py --prometheus http://127.0.0.1:9090 \
        --dashboard deploy/grafana/meshchat-dashboard.json --since 30m

    # a fixed window (unix seconds or RFC 3339), Markdown table, the alert rules too
    deploy/prometheus/check-dashboard.py --prometheus http://127.0.0.1:19090 \
        --start 2025-06-01T12:00:00Z --end 2025-06-01T12:05:00Z --markdown \
        --rules deploy/prometheus/alerts.yml

Variables: $node and $instance become --node / --instance (regexes, default `.*`, what
Grafana's "All" sends), $__rate_interval --rate-interval (default 30s; Grafana uses
max(4 x scrape interval, step + scrape interval)), $__interval the step, $__range the window.

--rules FILE (needs PyYAML) also evaluates each alerting rule's expression over the window
and says whether it returned anything (it would be pending; whether it fired depends on its
`for`, which the ALERTS series of a Prometheus that loaded the rules shows: also printed).
Rules do not change the exit status.

End the window while the nodes still run: the stat panels' instant queries are evaluated at
its end. "Returns data" is what is checked, not that the data is right: a counter created at
its first increment (errors by code: meshchat_requests_total{outcome!="ok"}) is present but its
rate() misses what happened before the first scrape that saw it (the auth-failure reasons,
rate-limited types and handshake outcomes that alerts use exist at 0 from a node's start).

Standard library only (urllib; PyYAML for --rules); no Grafana needed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import sys
import urllib.error
import urllib.parse
import urllib.request


def parse_time(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        pass
    t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp()


def parse_duration(s: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {s!r} (e.g. 30s, 5m, 1h)")
    mult = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return float(m.group(1)) * mult


def prom_get(base: str, path: str, params: list[tuple[str, str]]) -> dict:
    url = base.rstrip("/") + path + "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        try:
            body = json.load(e)
        except Exception:  # noqa: BLE001
            body = {"status": "error", "error": f"HTTP {e.code}"}
    if body.get("status") != "success":
        raise RuntimeError(body.get("error", "unknown error"))
    return body["data"]


def panels(items, row=""):
    """(row title, panel) for every panel, rows' collapsed panels included."""
    for p in items:
        if p.get("type") == "row":
            yield from panels(p.get("panels", []), p.get("title", ""))
            row = p.get("title", "")
            continue
        yield row, p
        yield from panels(p.get("panels", []), row)


def substitute(expr: str, v: dict[str, str]) -> str:
    # Longest names first so $__rate_interval is not read as $__rate + ...
    for name in sorted(v, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", v[name]).replace("$" + name, v[name])
    return expr


def count_series(result: list) -> tuple[int, int]:
    """(series, series with at least one value that is a number)."""
    with_numbers = 0
    for s in result:
        vals = s.get("values") or ([s["value"]] if "value" in s else [])
        if any(not math.isnan(float(x[1])) for x in vals):
            with_numbers += 1
    return len(result), with_numbers


def fmt_duration(secs: float) -> str:
    return f"{int(secs)}s" if secs >= 1 else f"{int(secs * 1000)}ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    ap.add_argument("--dashboard", default="deploy/grafana/meshchat-dashboard.json")
    ap.add_argument("--start", help="window start: unix seconds or RFC 3339")
    ap.add_argument("--end", help="window end (default: now)")
    ap.add_argument("--since", type=parse_duration, help="window = the last DURATION (instead of --start)")
    ap.add_argument("--step", type=parse_duration, default=None, help="query_range step (default: window/200, at least 5s)")
    ap.add_argument("--rate-interval", default="30s", help="value of $__rate_interval (default 30s)")
    ap.add_argument("--node", default=".*", help="value of $node (a regex; default .* = All)")
    ap.add_argument("--instance", default=".*", help="value of $instance (a regex; default .* = All)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--json", action="store_true", help="print one JSON object per query")
    ap.add_argument("--rules", help="also evaluate the alerting rules of this file over the window")
    a = ap.parse_args()

    end = parse_time(a.end) if a.end else dt.datetime.now(dt.timezone.utc).timestamp()
    if a.start:
        start = parse_time(a.start)
    elif a.since:
        start = end - a.since
    else:
        start = end - 30 * 60
    if end <= start:
        print("error: the window ends before it starts", file=sys.stderr)
        return 2
    step = a.step or max(5.0, (end - start) / 200)
    variables = {
        "node": a.node,
        "instance": a.instance,
        "__rate_interval": a.rate_interval,
        "__interval": fmt_duration(step),
        "__range": fmt_duration(end - start),
        "DS_PROMETHEUS": "prometheus",
    }

    with open(a.dashboard, encoding="utf-8") as f:
        dash = json.load(f)

    queries = []  # (panel, refId, kind, expr)
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if q:
            queries.append((f"variable ${var['name']}", "-", "variable", substitute(q, variables)))
    for row, p in panels(dash.get("panels", [])):
        title = f"{row} / {p.get('title', '?')}" if row else p.get("title", "?")
        for t in p.get("targets", []):
            if t.get("expr"):
                # Stat panels ask for the value now: an instant query at the window's end.
                kind = "instant" if t.get("instant") and not t.get("range") else "range"
                queries.append((title, t.get("refId", "?"), kind, substitute(t["expr"], variables)))

    rng = [("start", f"{start:.3f}"), ("end", f"{end:.3f}"), ("step", f"{step:g}")]
    rows, failed = [], 0
    for title, ref, kind, expr in queries:
        err = None
        try:
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", expr)
            if kind == "variable" and m:
                data = prom_get(a.prometheus, f"/api/v1/label/{m.group(2)}/values",
                                [("match[]", m.group(1))] + rng[:2])
                n = k = len(data)
                note = ",".join(data)
            elif kind == "instant":
                data = prom_get(a.prometheus, "/api/v1/query", [("query", expr), ("time", f"{end:.3f}")])
                n, k = count_series(data["result"])
                note = "instant, at the end: " + ",".join(
                    f"{s['metric'].get('node', s['metric'].get('instance', ''))}={s['value'][1]}"
                    for s in data["result"])
            else:
                data = prom_get(a.prometheus, "/api/v1/query_range", [("query", expr)] + rng)
                n, k = count_series(data["result"])
                note = ""
        except (urllib.error.URLError, OSError):
            raise  # Prometheus unreachable: not a dashboard problem (exit 2)
        except Exception as e:  # noqa: BLE001 (a query Prometheus refused: counts as no data)
            n = k = 0
            note = ""
            err = str(e)
        ok = k > 0
        failed += not ok
        rows.append({"panel": title, "ref": ref, "series": n, "with_data": k, "ok": ok,
                     "expr": expr, "values": note, "error": err})

    rule_rows = []
    if a.rules:
        try:
            import yaml  # type: ignore
        except ImportError:
            print("error: --rules needs PyYAML (apt install python3-yaml)", file=sys.stderr)
            return 2
        with open(a.rules, encoding="utf-8") as f:
            groups = yaml.safe_load(f)["groups"]
        for g in groups:
            for r in g.get("rules", []):
                if "alert" not in r:
                    continue
                expr = " ".join(r["expr"].split())
                try:
                    data = prom_get(a.prometheus, "/api/v1/query_range", [("query", expr)] + rng)
                    hits = sorted({json.dumps({k: v for k, v in s["metric"].items()
                                               if k in ("node", "instance", "peer")}, sort_keys=True)
                                   for s in data["result"]})
                    fired = prom_get(a.prometheus, "/api/v1/query_range",
                                     [("query", f'ALERTS{{alertname="{r["alert"]}",alertstate="firing"}}')] + rng)
                    fired_on = sorted({json.dumps({k: v for k, v in s["metric"].items()
                                                   if k in ("node", "instance", "peer")}, sort_keys=True)
                                       for s in fired["result"]})
                    rule_rows.append({"alert": r["alert"], "for": r.get("for", "0s"),
                                      "true_for": hits, "fired_for": fired_on, "error": None})
                except Exception as e:  # noqa: BLE001
                    rule_rows.append({"alert": r["alert"], "for": r.get("for", "0s"),
                                      "true_for": [], "fired_for": [], "error": str(e)})

    when = (f"{dt.datetime.fromtimestamp(start, dt.timezone.utc):%Y-%m-%d %H:%M:%S} to "
            f"{dt.datetime.fromtimestamp(end, dt.timezone.utc):%H:%M:%S} UTC, step {step:g}s, "
            f"$__rate_interval={a.rate_interval}, $node={a.node}, $instance={a.instance}")
    if a.json:
        for r in rows:
            print(json.dumps(r))
        for r in rule_rows:
            print(json.dumps(r))
    elif a.markdown:
        print(f"Window: {when}\n")
        print("| panel | ref | series | with data | ok | expr |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            expr = r["expr"].replace("|", "\\|")
            extra = f" → {r['values']}" if r["values"] else ""
            extra += f" (error: {r['error']})" if r["error"] else ""
            print(f"| {r['panel']} | {r['ref']} | {r['series']} | {r['with_data']} | "
                  f"{'yes' if r['ok'] else '**NO DATA**'} | `{expr}`{extra} |")
        if rule_rows:
            print("\n| alert | for | expr true during the window for | fired (ALERTS) for |")
            print("|---|---|---|---|")
            for r in rule_rows:
                t = "; ".join(r["true_for"]) or "never"
                fi = "; ".join(r["fired_for"]) or "never"
                if r["error"]:
                    t = f"error: {r['error']}"
                print(f"| {r['alert']} | {r['for']} | {t} | {fi} |")
    else:
        print(f"window: {when}")
        for r in rows:
            status = "ok     " if r["ok"] else "NO DATA"
            extra = f"  [{r['values']}]" if r["values"] else ""
            extra += f"  error: {r['error']}" if r["error"] else ""
            print(f"{status} {r['series']:3d} series {r['with_data']:3d} with data  "
                  f"{r['panel']} ({r['ref']}): {r['expr']}{extra}")
        for r in rule_rows:
            t = "; ".join(r["true_for"]) or "never"
            fi = "; ".join(r["fired_for"]) or "never"
            print(f"rule {r['alert']} (for {r['for']}): expr true for {t}; fired for {fi}"
                  + (f"  error: {r['error']}" if r["error"] else ""))
    print(f"\n{len(rows) - failed} of {len(rows)} queries returned data"
          + (f"; {failed} returned none" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, urllib.error.URLError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
