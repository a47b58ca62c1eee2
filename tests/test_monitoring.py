"""Monitoring config: Prometheus config and alert rules pass promtool (and their unit tests); every metric the
alerts and the Grafana dashboard query is one the service exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.metrics import Metrics

MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")


def _promtool(*args: str) -> str:
    done = subprocess.run([PROMTOOL, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60)  # type: ignore[list-item]
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@needs_promtool
def test_promtool_accepts_the_config_and_the_rules() -> None:
    assert "SUCCESS: 1 rule files found" in _promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 5 rules found" in _promtool("check", "rules", "alerts.yml")


@needs_promtool
def test_the_alert_rules_pass_their_unit_tests() -> None:
    _promtool("test", "rules", "alerts.test.yml")


def _exported() -> set[str]:
    """Sample names the service exports: counters' _total, histograms' _bucket/_sum/_count, gauges."""
    names = set()
    for family in Metrics().registry.collect():
        kind = family.type
        names |= {f"{family.name}_total"} if kind == "counter" else set()
        names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")} if kind == "histogram" else set()
        names |= {family.name} if kind in ("gauge", "unknown") else set()
    return names


def _queried(expr: str) -> set[str]:
    return set(re.findall(r"\breprmerge_[a-z_]+", expr))


def test_alerts_and_dashboard_query_only_exported_metrics() -> None:
    exprs = [r["expr"] for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "reprmerge.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queried = set().union(*map(_queried, exprs))
    assert len(queried) >= 12 and queried <= _exported(), sorted(queried - _exported())
