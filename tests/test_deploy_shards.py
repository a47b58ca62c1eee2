"""Calibration beyond one machine: `calibrate --shard I/N` files added by `reduce` equal one unsharded pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from reprmerge_cli import main as cli
from reprmerge_core.bundle import load_bundle
from tests.helpers import make_tiny_backbone
from tests.test_calibrate import checkpoints  # noqa: F401  (module-scoped fixture: user checkpoints + inputs)

SHARDS = 3


def _calibrate(c: dict[str, Path], out: Path, *extra: str, topic: str = "linear") -> list[str]:
    return ["calibrate", "--backbone", str(c["backbone"]), "--expert", f"topic={c[topic]}", "--expert",
            f"other={c['other']}",
            "--calibration", f"topic={c['root'] / 'a.txt'}", "--calibration", f"other={c['root'] / 'c.jsonl'}",
            "--folds", "4", "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def experts(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """The user's checkpoints plus a second distinct expert (an expert equal to the backbone leaves beta
    undetermined)."""
    other = make_tiny_backbone(tmp_path_factory.mktemp("other") / "other_expert", seed=7)
    save_file({"weight": torch.randn(2, 32, generator=torch.Generator().manual_seed(8)), "bias": torch.zeros(2)},
              str(other / "head.safetensors"))
    return {**checkpoints, "other": other}


@pytest.fixture(scope="module")
def shard_files(experts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("shards")
    files = [root / f"shard-{i}.safetensors" for i in range(SHARDS)]
    for i, file in enumerate(files):
        assert cli(_calibrate(experts, file, "--shard", f"{i}/{SHARDS}")) == 0
    return files


def test_reduced_shards_equal_one_unsharded_pass(experts: dict[str, Path], shard_files: list[Path],
                                                 tmp_path: Path) -> None:
    assert cli(_calibrate(experts, tmp_path / "whole")) == 0
    assert cli(["reduce", *map(str, reversed(shard_files)), "--out", str(tmp_path / "reduced")]) == 0
    whole, reduced = load_bundle(tmp_path / "whole"), load_bundle(tmp_path / "reduced")
    assert reduced.task_names == whole.task_names
    samples = [t.calibration_samples for t in reduced.manifest.tasks]
    assert samples == [t.calibration_samples for t in whole.manifest.tasks] == [24, 24]
    for a, b in zip(reduced.statistics, whole.statistics, strict=True):
        assert a.n == b.n
        torch.testing.assert_close(a.A, b.A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.B, b.B, rtol=1e-5, atol=1e-6)
        assert a.e == pytest.approx(b.e, rel=1e-6)
    for h, k in zip(reduced.heads, whole.heads, strict=True):
        torch.testing.assert_close(h.weight, k.weight, rtol=0, atol=0)
    # the label-free beta choice sees the same per-fold statistics
    got, want = reduced.manifest.correction.beta_selection, whole.manifest.correction.beta_selection
    assert got is not None and want is not None
    assert reduced.manifest.correction.beta == whole.manifest.correction.beta
    assert got["score"] == pytest.approx(want["score"], rel=1e-5)
    assert reduced.manifest.extra["shards"] == SHARDS
    assert reduced.manifest.expert_diagnostics is not None
    assert reduced.manifest.expert_diagnostics == whole.manifest.expert_diagnostics  # carried through the shards
    assert reduced.manifest.files["backbone/model.safetensors"] == whole.manifest.files["backbone/model.safetensors"]


def test_shard_files_carry_their_manifest_and_hash(shard_files: list[Path]) -> None:
    with safe_open(str(shard_files[1]), "pt") as f:
        manifest = json.loads(f.metadata()["manifest"])
    assert (manifest["index"], manifest["count"], manifest["folds"]) == (1, SHARDS, 4)
    assert [t["inputs"] for t in manifest["tasks"]] == [24, 24] and len(manifest["tensors_sha256"]) == 64
    # shard 1 of 3 holds inputs 1, 4, 7, ...: 8 of each task's 24
    assert load_file(str(shard_files[1]))["n"].sum(dim=1).tolist() == [8, 8]


def test_reduce_refuses_incomplete_duplicate_damaged_or_foreign_shards(
    experts: dict[str, Path], shard_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = ["--out", str(tmp_path / "bundle")]
    a, b, c = map(str, shard_files)
    assert cli(["reduce", a, c, *out]) == 2
    assert "missing shards 1/3" in capsys.readouterr().err
    assert cli(["reduce", a, b, c, a, *out]) == 2
    assert "duplicate shard 0/3" in capsys.readouterr().err
    # a shard of another calibration: a different expert for the same task name
    foreign = tmp_path / "foreign.safetensors"
    assert cli(_calibrate(experts, foreign, "--shard", f"1/{SHARDS}", topic="same")) == 0
    assert cli(["reduce", a, str(foreign), c, *out]) == 2
    err = capsys.readouterr().err
    assert "is not from the calibration" in err and "tasks" in err
    # other shard counts do not mix either
    other_count = tmp_path / "half.safetensors"
    assert cli(_calibrate(experts, other_count, "--shard", "1/2")) == 0
    assert cli(["reduce", a, str(other_count), *out]) == 2
    assert "count" in capsys.readouterr().err
    # damaged tensors are caught by the shard's own hash
    tensors = load_file(b)
    with safe_open(b, "pt") as f:
        meta = f.metadata()
    tensors["e"][0, 0] += 1.0
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged), metadata=meta)
    assert cli(["reduce", a, str(damaged), c, *out]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert cli(["reduce", a, str(experts["linear"] / "head.safetensors"), c, *out]) == 2
    assert "not a reprmerge calibration shard" in capsys.readouterr().err
    # a backbone that is not the one the shards saw
    assert cli(["reduce", a, b, c, "--backbone", str(experts["linear"]), *out]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()


def test_shard_argument_is_validated(experts: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("3/3", "-1/2", "1", "a/b"):
        with pytest.raises(SystemExit):
            cli(_calibrate(experts, tmp_path / "x.safetensors", "--shard", bad))
        assert "I/N" in capsys.readouterr().err
