"""The `tiny` suite end to end on real data and the real MiniLM: build, evaluate, rebuild."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reprmerge_cli import main as cli
from reprmerge_core.artifacts import sha256_file
from reprmerge_core.backbone import Backbone, default_backbone_path
from reprmerge_core.bundle import load_bundle
from reprmerge_core.calibration import collect_statistics
from reprmerge_core.correction import TaskStatistics
from reprmerge_core.data import load_suite
from reprmerge_core.evaluation import EvaluationInputs, evaluate_bundle
from reprmerge_core.evaluation.report import write_report
from reprmerge_core.merging import merge_checkpoints
from reprmerge_core.pipeline.build import suite_from_extra
from reprmerge_core.training import RECIPES, train_experts


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("expert-cache")


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    assert cli(["build", "--suite", "tiny", "--merge", "ties", "--out", str(out), "--device", "cpu",
                "--cache-dir", str(cache)]) == 0
    return out


def test_bundle_records_what_built_it(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    m = bundle.manifest
    assert m.task_names == ["sms_spam", "trec6", "movie_sentiment"]
    assert [t.calibration_samples for t in m.tasks] == [500, 500, 500]
    assert m.merge.method == "ties" and m.merge.parameters["density"] == 0.2
    sel = m.correction.beta_selection
    assert sel is not None
    # which beta the curves choose is checked against a data computation in test_calibration; here: it was recorded
    assert sel["chosen"] and m.correction.beta == sel["beta"] in sel["candidates"]
    assert len(sel["score"]) == len(sel["one_hot"]) == len(sel["equal"]) == len(sel["candidates"]) > 1
    timings = m.extra["timings"]
    assert timings["statistics_accumulate"] < 0.1 * timings["statistics_forward"]
    assert len(m.extra["statistics_per_task_seconds"]) == 3


def test_react_one_hot_beats_the_merged_backbone(tiny_bundle: Path, cache: Path, tmp_path: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    suite, recipe = suite_from_extra(bundle.manifest.extra)
    splits = load_suite(suite)
    experts = train_experts(splits, recipe, cache_dir=cache, device="cpu", progress=False)
    assert not any(e.trained for e in experts)  # the build's experts, from the cache
    report = evaluate_bundle(bundle, EvaluationInputs(splits, experts, torch.device("cpu")), grid_steps=2,
                             baseline=False, sweep_beta=False, progress=False)
    merged = report["scenarios"]["merged"]["mean_accuracy"]
    one_hot = sum(report["one_hot"]["accuracy"]) / 3
    assert one_hot > merged, f"ReACT one-hot {one_hot:.3f} does not beat the merged backbone {merged:.3f}"
    assert report["one_hot"]["mean_normalised"] > report["scenarios"]["merged"]["mean_normalised"]
    assert 0 < report["grid"]["react"]["hypervolume"] <= 1.2
    out = write_report(report, tmp_path / "report")
    assert {"report.md", "report.json", "pareto.png", "scenarios.png"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "report.json").read_text())["bundle_id"] == bundle.manifest.bundle_id


def test_rebuild_reproduces_the_merge_and_the_statistics(tiny_bundle: Path, cache: Path, tmp_path: Path) -> None:
    """What a rebuild repeats, without a second whole build: merging the cached experts again gives the bundle's
    weights bit for bit, and the statistics pass on 50 calibration inputs (determinism needs no more) equals a
    float64 computation from the two backbones' features."""
    bundle = load_bundle(tiny_bundle)
    suite, recipe = suite_from_extra(bundle.manifest.extra)
    splits = load_suite(suite)
    experts = train_experts(splits, recipe, cache_dir=cache, device="cpu", progress=False)
    assert not any(e.trained for e in experts)  # the very experts the bundle was built from
    merge_checkpoints(default_backbone_path(), {e.task: e.path for e in experts}, "ties", None, None,
                      tmp_path / "merged", max_length=recipe.max_length, progress=False)
    assert sha256_file(tmp_path / "merged" / "model.safetensors") == bundle.manifest.files["backbone/model.safetensors"]
    merged = Backbone.from_pretrained(tmp_path / "merged", pooling=recipe.pooling, max_length=recipe.max_length,
                                      device="cpu")
    expert, texts = experts[1].backbone(device="cpu"), list(splits[1].calibration[:50])
    got = collect_statistics(merged, [expert], [texts], progress=False).folds[0][0]
    want = TaskStatistics.from_features(merged.encode(texts).double(), expert.encode(texts).double())
    scale = want.A.abs().max()
    assert (got.A - want.A).abs().max() <= 1e-6 * scale and (got.B - want.B).abs().max() <= 1e-6 * scale
    assert got.n == want.n == 50 and abs(got.e - want.e) <= 1e-6 * want.e


def test_build_refuses_bad_requests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["build", "--tasks", "sms_spam,nope", "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli(["build", "--suite", "tiny", "--set", "density=2", "--out", str(tmp_path / "x")]) == 2
    assert "density" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bundles_from_before_per_task_seeds_evaluate_with_their_own_experts() -> None:
    """A bundle's recorded recipe without `seeding` was trained with one seed for all tasks."""
    suite = {"tasks": ["sms_spam"]}
    old = {k: v for k, v in RECIPES["tiny"].model_dump(mode="json").items() if k != "seeding"}
    assert suite_from_extra({"suite": suite, "recipe": old})[1].seeding == "shared"
    new = RECIPES["tiny"].model_dump(mode="json")
    assert suite_from_extra({"suite": suite, "recipe": new})[1] == RECIPES["tiny"]
