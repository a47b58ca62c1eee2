"""Monitoring config: the Prometheus config and alert rules pass promtool, and the rules their unit tests
(the metric names they use are checked in test_deploy_manifests)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None,
                                    reason="promtool not installed (Debian: apt-get install prometheus)")


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
