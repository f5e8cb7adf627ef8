"""The Grafana dashboard in deploy/grafana reads only series /metrics exports, with labels they carry."""

from __future__ import annotations

import json
import re
from pathlib import Path

from api.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "axion-dashboard.json"
SUFFIXES = ("_bucket", "_total", "_sum", "_count")


def test_every_panel_queries_exported_series_and_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    families = {m.name: m for m in Metrics().registry.collect()}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 13
    for expr in exprs:
        for series in re.findall(r"axion:[a-z0-9_]+", expr):
            base = next((series.removesuffix(s) for s in SUFFIXES if series.endswith(s)
                         and series.removesuffix(s) in families), series)
            assert base in families, f"{series} is not exported"
    declared = {name: set(collector._labelnames)  # type: ignore[attr-defined]
                for collector in Metrics().registry._collector_to_names  # type: ignore[attr-defined]
                for name in [getattr(collector, "_name", "")] if name}
    for expr in exprs:
        for grouping in re.findall(r"by \(([a-z_, ]+)\)", expr):
            used = {g.strip() for g in grouping.split(",")} - {"le"}
            series = re.findall(r"axion:[a-z0-9_]+", expr.split("by (" + grouping + ")")[1])[0]
            base = next((series.removesuffix(s) for s in SUFFIXES if series.endswith(s)), series)
            assert used <= declared[base], f"{expr}: {used - declared[base]} not a label of {base}"
