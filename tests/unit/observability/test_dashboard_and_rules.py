"""The Grafana dashboard and the Prometheus rules stay true to the series the services export."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from scripts.gen_dashboard import TARGET, queries, render
from tests.fixtures.tools import system_tool

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
# Series names as the services declare them (a Counter "x_total" or a Histogram "x").
DECLARED = re.compile(r'"((?:infermesh|grpc_server)_[a-z_]+)"')


def _declared_series() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "services").rglob("*.py"):
        names |= set(DECLARED.findall(path.read_text()))
    return names


def _recorded() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def _base_name(series: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def test_dashboard_file_is_current() -> None:
    assert TARGET.read_text() == render(), "run `python scripts/gen_dashboard.py`"
    panels = json.loads(TARGET.read_text())["panels"]
    assert {p["title"] for p in panels if p["type"] == "row"} >= {
        "Golden signals per service",
        "Admission queue",
    }


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_series_queried_is_exported_or_recorded(source: str) -> None:
    if source == "dashboard":
        exprs = queries()
    else:
        groups = yaml.safe_load(RULES.read_text())["groups"]
        exprs = [rule["expr"] for group in groups for rule in group["rules"]]
    known = _declared_series() | _recorded()
    used = {
        name
        for expr in exprs
        for name in re.findall(r"[a-z_:]+(?=[{\[ )]|$)", re.sub(r'"[^"]*"', "", expr))
        if "infermesh" in name or name.startswith("grpc_server") or ":" in name
    }
    unknown = {n for n in used if _base_name(n) not in known and n.removesuffix("_total") not in known}
    assert not unknown, f"{source} queries series nobody exports: {sorted(unknown)}"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    promtool = system_tool("promtool")
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"q:{i}", "expr": e} for i, e in enumerate(queries())]}
        ]
    }
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
