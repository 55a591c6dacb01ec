#!/usr/bin/env python3
"""Check the monitoring files under deploy/ against each other and README.md.

Run from anywhere (CI runs it from the repository root):

    python3 deploy/check/promql.py

It checks that
  - every query of the Grafana dashboard (panels and template variables), with
    its variables replaced by sample values, is PromQL that promtool parses;
  - every `tidegate_*` metric the dashboard or the rules name is in the table of
    README.md's "Metrics" section (histograms with their _bucket, _sum, _count);
  - `promtool check rules` and `promtool test rules` pass on the alert rules and
    their tests, without warnings, and every alert has a severity, a summary, a
    description, a runbook naming a section of deploy/README.md (checked once
    that file exists), and a unit test;
  - panel ids are unique, panels do not overlap, and every panel has a
    description and the `datasource` variable as its data source.

Standard library only, plus promtool (from PATH, or the PROMTOOL variable).
Exits 1 and names the panel or rule on any failure.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DEPLOY_README = ROOT / "deploy" / "README.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "tidegate.json"
RULES = ROOT / "deploy" / "prometheus" / "tidegate-rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tidegate-rules.test.yaml"

# Grafana's own variables, as promtool should see them (longest names first).
BUILTIN_VARIABLES = [
    ("__rate_interval", "1m"),
    ("__interval_ms", "60000"),
    ("__interval", "1m"),
    ("__range_ms", "3600000"),
    ("__range_s", "3600"),
    ("__range", "1h"),
]
# What a dashboard variable becomes: valid in a regex matcher and in a string.
VARIABLE_SAMPLE = ".*"
DATASOURCE_UIDS = {"${datasource}", "$datasource"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])tidegate_[A-Za-z0-9_]*[A-Za-z0-9]")
FIXED_RANGE = re.compile(r"\[\s*\d+(ms|[smhdwy])")


class Check:
    """Collects failures and counts, so that one run reports every problem."""

    def __init__(self):
        self.failures = []
        self.notes = []

    def fail(self, message):
        self.failures.append(message)

    def note(self, message):
        self.notes.append(message)


def run_promtool(promtool, *args):
    """promtool's exit code and its output (stdout and stderr together)."""
    done = subprocess.run(
        [promtool, *args], capture_output=True, text=True, check=False
    )
    return done.returncode, (done.stdout + done.stderr).strip()


def promtool_failed(code, output):
    """promtool reports lint findings (duplicate rules) as FAILED with exit 0."""
    lowered = output.lower()
    return code != 0 or "failed" in lowered or "duplicate" in lowered or "warning" in lowered


# README.md


def readme_metrics(check):
    """{name: type} from the rows of README.md's Metrics table."""
    metrics = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `tidegate_"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        metrics[cells[0].strip("`")] = cells[1] if len(cells) > 1 else ""
    if not metrics:
        check.fail("README.md: no metric rows (| `tidegate_...) found in its Metrics table")
    return metrics


def unknown_metrics(text, metrics):
    """The tidegate_* names in text that README.md's table does not list."""
    unknown = set()
    for name in METRIC_NAME.findall(text):
        if name in metrics:
            continue
        base = next(
            (name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None
        )
        if base is not None and metrics.get(base) == "histogram":
            continue
        unknown.add(name)
    return sorted(unknown)


# Dashboard


def substitute(expr):
    """expr with Grafana's variables replaced by values promtool can parse."""
    for name, value in BUILTIN_VARIABLES:
        expr = re.sub(r"\$\{" + name + r"(:[^}]*)?\}", value, expr)
        expr = re.sub(r"\$" + name + r"(?![A-Za-z0-9_])", value, expr)
    expr = re.sub(r"\$\{[A-Za-z0-9_]+(:[^}]*)?\}", VARIABLE_SAMPLE, expr)
    expr = re.sub(r"\[\[[A-Za-z0-9_]+(:[^\]]*)?\]\]", VARIABLE_SAMPLE, expr)
    return re.sub(r"\$[A-Za-z_][A-Za-z0-9_]*", VARIABLE_SAMPLE, expr)


def variable_promql(query):
    """The PromQL inside a Prometheus template variable's query, or None."""
    query = query.strip()
    match = re.fullmatch(r"label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)", query, re.S)
    if match:
        return match.group(1)
    match = re.fullmatch(r"query_result\((.*)\)", query, re.S)
    if match:
        return match.group(1)
    if re.fullmatch(r"(label_values|label_names|metrics)\(.*\)", query, re.S):
        return None  # no PromQL: a label or metric name pattern
    return query


def all_panels(panels):
    """Every panel, the ones inside collapsed rows too."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def check_dashboard(check, dashboard, metrics):
    """Panel checks; returns [(record name, what, expression)] for promtool."""
    queries = []
    seen_ids = {}
    panels = list(all_panels(dashboard.get("panels", [])))
    variables = dashboard.get("templating", {}).get("list", [])
    if not any(v.get("type") == "datasource" and v.get("name") == "datasource" for v in variables):
        check.fail("dashboard: no template variable `datasource` of type datasource")

    for panel in panels:
        title = panel.get("title") or "(untitled)"
        pid = panel.get("id")
        what = f'panel {pid} "{title}"'
        if pid in seen_ids:
            check.fail(f'{what}: id {pid} also used by "{seen_ids[pid]}"')
        seen_ids[pid] = title
        # A row's own fields only: the panels inside it come in their turn.
        text = json.dumps({k: v for k, v in panel.items() if k != "panels"})
        for name in unknown_metrics(text, metrics):
            check.fail(f"{what}: {name} is not in README.md's Metrics table")
        if panel.get("type") == "row":
            continue
        if not (panel.get("description") or "").strip():
            check.fail(f"{what}: no description")
        uid = (panel.get("datasource") or {}).get("uid")
        if uid not in DATASOURCE_UIDS:
            check.fail(f"{what}: data source {uid!r}, not the datasource variable")
        for target in panel.get("targets", []):
            ref = target.get("refId", "?")
            tuid = (target.get("datasource") or {}).get("uid", "${datasource}")
            if tuid not in DATASOURCE_UIDS:
                check.fail(f"{what}, query {ref}: data source {tuid!r}, not the datasource variable")
            expr = target.get("expr", "")
            if not expr.strip():
                check.fail(f"{what}, query {ref}: empty expression")
                continue
            if FIXED_RANGE.search(expr):
                check.fail(f"{what}, query {ref}: a fixed range; use $__rate_interval")
            # Numbered, so that a duplicate panel id does not make duplicate rules.
            record = f"dashboard:q{len(queries)}_panel_{pid}_{re.sub(r'[^A-Za-z0-9_]', '_', ref)}"
            queries.append((record, f"{what}, query {ref}", substitute(expr)))

    for variable in variables:
        if variable.get("type") != "query":
            continue
        name = variable.get("name", "?")
        query = variable.get("query", "")
        if isinstance(query, dict):
            query = query.get("query", "")
        for metric in unknown_metrics(query, metrics):
            check.fail(f"variable {name}: {metric} is not in README.md's Metrics table")
        promql = variable_promql(query)
        if promql is not None:
            queries.append((f"dashboard:variable_{name}", f"variable {name}", substitute(promql)))

    check_layout(check, dashboard.get("panels", []))
    rows = sum(p.get("type") == "row" for p in panels)
    check.note(
        f"dashboard: {len(panels)} panels ({rows} rows): ids, descriptions, data sources, layout"
    )
    return queries


def check_layout(check, panels):
    """Top-level panels fit the 24-column grid and do not overlap."""
    placed = []
    for panel in panels:
        grid = panel.get("gridPos") or {}
        what = f'panel {panel.get("id")} "{panel.get("title")}"'
        try:
            x, y, w, h = (int(grid[k]) for k in ("x", "y", "w", "h"))
        except (KeyError, TypeError, ValueError):
            check.fail(f"{what}: no complete gridPos")
            continue
        if x < 0 or w <= 0 or h <= 0 or x + w > 24:
            check.fail(f"{what}: gridPos {grid} does not fit the 24-column grid")
        for other, (ox, oy, ow, oh) in placed:
            if x < ox + ow and ox < x + w and y < oy + oh and oy < y + h:
                check.fail(f"{what}: overlaps {other}")
        placed.append((what, (x, y, w, h)))


def parse_with_promtool(check, promtool, queries):
    """Write the queries as recording rules and have promtool parse them."""
    if not queries:
        check.fail("dashboard: no queries found")
        return
    names = {record: what for record, what, _ in queries}
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": record, "expr": expr} for record, _, expr in queries
    ]}]}
    # JSON is YAML, so promtool reads this file as it is.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dashboard-queries.yaml"
        path.write_text(json.dumps(rules, indent=2), encoding="utf-8")
        code, output = run_promtool(promtool, "check", "rules", str(path))
    if promtool_failed(code, output):
        named = False
        for line in output.splitlines():
            match = re.search(r'"(dashboard:[A-Za-z0-9_:]+)": (.*)', line)
            if match:
                named = True
                check.fail(f"{names.get(match.group(1), match.group(1))}: {match.group(2)}")
        if not named:
            check.fail(f"dashboard queries: promtool check rules failed:\n{output}")
    else:
        check.note(f"dashboard: {len(queries)} queries parsed by promtool check rules")


# Rules


def rule_blocks(text):
    """[(alert name, block text)] of the rules file, without a YAML library."""
    blocks = []
    current = None
    for line in text.splitlines():
        match = re.match(r"\s*- (alert|record):\s*['\"]?([^'\"\s#]+)", line)
        if match or re.match(r"\s*- name:", line):
            current = None
        if match:
            current = [match.group(1), match.group(2), []]
            blocks.append(current)
        if current is not None:
            current[2].append(line)
    return [(kind, name, "\n".join(lines)) for kind, name, lines in blocks]


def anchors(markdown):
    """GitHub's anchors for the headings of a Markdown file."""
    found = set()
    for line in markdown.splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


def check_rules(check, promtool, metrics):
    text = RULES.read_text(encoding="utf-8")
    tests = RULE_TESTS.read_text(encoding="utf-8")
    tested = set(re.findall(r"alertname:\s*['\"]?([A-Za-z0-9_]+)", tests))
    runbooks = None
    if DEPLOY_README.exists():
        runbooks = anchors(DEPLOY_README.read_text(encoding="utf-8"))

    header = text.split("groups:", 1)[0]
    for name in unknown_metrics(header, metrics):
        check.fail(f"{RULES.name} (comments): {name} is not in README.md's Metrics table")
    blocks = rule_blocks(text)
    alerts = [name for kind, name, _ in blocks if kind == "alert"]
    missing_sections = {}
    for kind, name, block in blocks:
        what = f"{kind} {name}"
        for metric in unknown_metrics(block, metrics):
            check.fail(f"{what}: {metric} is not in README.md's Metrics table")
        if kind != "alert":
            continue
        if not re.search(r"^\s*severity:\s*['\"]?(critical|warning)['\"]?\s*$", block, re.M):
            check.fail(f"{what}: no severity label critical or warning")
        for annotation in ("summary", "description", "runbook"):
            if not re.search(rf"^\s*{annotation}:\s*\S", block, re.M):
                check.fail(f"{what}: no {annotation} annotation")
        runbook = re.search(r"^\s*runbook:\s*\S*#([\w-]+)", block, re.M)
        if runbook and runbooks is not None and runbook.group(1) not in runbooks:
            missing_sections.setdefault(runbook.group(1), []).append(name)
        if name not in tested:
            check.fail(f"{what}: no unit test in {RULE_TESTS.name}")
    for section, names in missing_sections.items():
        check.fail(f"deploy/README.md has no section #{section}, the runbook of {', '.join(names)}")
    if not alerts:
        check.fail(f"{RULES.name}: no alerts found")

    code, output = run_promtool(promtool, "check", "rules", str(RULES))
    if promtool_failed(code, output):
        check.fail(f"promtool check rules {RULES.name}:\n{output}")
    else:
        check.note(f"promtool check rules: {len(blocks)} rules, no warnings")
    code, output = run_promtool(promtool, "test", "rules", str(RULE_TESTS))
    if code != 0 or "SUCCESS" not in output:
        check.fail(f"promtool test rules {RULE_TESTS.name}:\n{output}")
    else:
        check.note(f"promtool test rules: {len(tested)} alerts tested, SUCCESS")
    check.note(
        f"rules: {len(alerts)} alerts, each with a severity, summary, description, runbook and test"
        + ("" if runbooks is not None else " (deploy/README.md absent: runbook sections unchecked)")
    )


def main():
    check = Check()
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not promtool:
        print("FAIL: promtool not found (install prometheus, or set PROMTOOL)", file=sys.stderr)
        return 1
    metrics = readme_metrics(check)
    check.note(f"README.md: {len(metrics)} metrics in the Metrics table")

    try:
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        check.fail(f"{DASHBOARD.relative_to(ROOT)}: {e}")
        dashboard = None
    if dashboard is not None:
        queries = check_dashboard(check, dashboard, metrics)
        parse_with_promtool(check, promtool, queries)
        used = set(METRIC_NAME.findall(DASHBOARD.read_text(encoding="utf-8")))
        check.note(f"dashboard: {len(used)} tidegate_* names checked against README.md")

    check_rules(check, promtool, metrics)
    used = set(METRIC_NAME.findall(RULES.read_text(encoding="utf-8")))
    check.note(f"rules: {len(used)} tidegate_* names checked against README.md")

    for note in check.notes:
        print(f"ok: {note}")
    for failure in check.failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    if check.failures:
        print(f"{len(check.failures)} problem(s) found", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
