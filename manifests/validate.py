#!/usr/bin/env python3
"""Helpers of validate.sh that need a YAML/JSON parser.

  validate.py crds RENDERED SCHEMA_DIR BUILTINS_OUT   check the prometheus-operator kinds
      against their CRD schemas; write every other document to BUILTINS_OUT
  validate.py rules PROMETHEUSRULE OUT                 the PrometheusRule's groups as a
      Prometheus rule file (for promtool)
  validate.py dashboard-rules DASHBOARD OUT            every dashboard query as a recording
      rule (promtool then parses each expression)
  validate.py dashboard-metrics DASHBOARD EXPOSITION   every metric a dashboard query names
      is in the service's /metrics output
"""
import json
import re
import sys
from pathlib import Path

import jsonschema
import yaml

CRD_FILES = {
    "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
    "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
}


def crd_schema(path, api_version):
    crd = yaml.safe_load(Path(path).read_text())
    version = api_version.split("/")[-1]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise SystemExit(f"{path}: no schema for version {version}")


def crds(rendered, schema_dir, builtins_out):
    docs = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]
    builtins, failures = [], 0
    for doc in docs:
        kind = doc.get("kind")
        name = f"{kind}/{doc.get('metadata', {}).get('name')}"
        if kind in CRD_FILES and not schema_dir:
            print(f"SKIPPED {name}: no CRD schema directory given (SCHEMAS)")
        elif kind in CRD_FILES:
            schema = crd_schema(Path(schema_dir) / CRD_FILES[kind], doc["apiVersion"])
            # The CRD schema leaves metadata to the API server; check the rest strictly.
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
            for e in errors:
                failures += 1
                print(f"FAIL {name}: {'/'.join(map(str, e.path))}: {e.message}")
            if not errors:
                print(f"ok   {name} against {CRD_FILES[kind]}")
        else:
            builtins.append(doc)
    Path(builtins_out).write_text(yaml.safe_dump_all(builtins, sort_keys=False))
    if failures:
        raise SystemExit(1)


def rules(prometheusrule, out):
    doc = yaml.safe_load(Path(prometheusrule).read_text())
    Path(out).write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}, sort_keys=False))


def dashboard_exprs(path):
    dash = json.loads(Path(path).read_text())
    exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            exprs.append((panel["title"], target["expr"]))
    if not exprs:
        raise SystemExit("dashboard has no queries")
    return dash, exprs


def dashboard_rules(path, out):
    dash, exprs = dashboard_exprs(path)
    if dash.get("title") != "IoT Stream Processor":
        raise SystemExit(f"dashboard title is {dash.get('title')!r}")
    group = {
        "name": "dashboard",
        "rules": [{"record": f"dashboard:query_{i}", "expr": e} for i, (_, e) in enumerate(exprs)],
    }
    Path(out).write_text(yaml.safe_dump({"groups": [group]}, sort_keys=False))
    print(f"{len(exprs)} dashboard queries written as rules")


PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "le", "inf", "nan",
}


def metric_names(expr):
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                    # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                   # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = m.group(0)
        rest = expr[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def dashboard_metrics(path, exposition):
    _, exprs = dashboard_exprs(path)
    exported = set()
    for line in Path(exposition).read_text().splitlines():
        if line and not line.startswith("#"):
            exported.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    failures = 0
    for title, expr in exprs:
        for name in sorted(metric_names(expr)):
            if name in exported:
                continue
            failures += 1
            print(f"FAIL panel {title!r}: {name} is not exported by the service")
    if failures:
        raise SystemExit(1)
    print(f"every metric named by {len(exprs)} dashboard queries is exported by the service")


if __name__ == "__main__":
    commands = {
        "crds": crds,
        "rules": rules,
        "dashboard-rules": dashboard_rules,
        "dashboard-metrics": dashboard_metrics,
    }
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
