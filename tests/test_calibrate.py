"""`reprmerge calibrate` on real (tiny) transformers checkpoints: both head kinds and the refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, BertConfig, BertForSequenceClassification

from reprmerge_core.backbone import Backbone
from reprmerge_core.bundle import load_bundle
from reprmerge_cli import main as cli
from reprmerge_core.correction import CorrectionSolver
from reprmerge_core.merging.diagnostics import task_vector_norm
from tests.helpers import TOKENIZER_FILES, make_tiny_backbone

TEXTS = [f"an input sentence about topic {i} and more {i % 3}" for i in range(24)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("user")
    linear = make_tiny_backbone(root / "linear_expert", seed=3)
    torch.manual_seed(4)
    save_file({"weight": torch.randn(3, 32), "bias": torch.randn(3)}, str(linear / "head.safetensors"))
    same = shutil.copytree(tiny_backbone_dir, root / "same_expert")
    save_file({"weight": torch.randn(2, 32), "bias": torch.randn(2)}, str(same / "head.safetensors"))
    config = BertConfig.from_pretrained(tiny_backbone_dir, num_labels=2, id2label={0: "neg", 1: "pos"},
                                        label2id={"neg": 0, "pos": 1})
    cls_dir = root / "cls_expert"
    BertForSequenceClassification(config).save_pretrained(cls_dir)
    for name in TOKENIZER_FILES:
        if (tiny_backbone_dir / name).exists():
            shutil.copy(tiny_backbone_dir / name, cls_dir / name)
    for name in ("a", "b"):
        (root / f"{name}.txt").write_text("\n".join(TEXTS) + "\n")
    (root / "c.jsonl").write_text("\n".join(f'{{"text": "{t}"}}' for t in TEXTS))
    return {"root": root, "linear": linear, "cls": cls_dir, "same": same, "backbone": tiny_backbone_dir}


def test_calibrate_with_separate_linear_heads(checkpoints: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    c = checkpoints
    out = tmp_path / "bundle"
    assert cli(["calibrate", "--backbone", str(c["backbone"]), "--expert", f"topic={c['linear']}",
                "--expert", f"same={c['same']}", "--calibration", f"topic={c['root'] / 'a.txt'}",
                "--calibration", f"same={c['root'] / 'c.jsonl'}", "--out", str(out), "--folds", "3"]) == 0
    bundle = load_bundle(out)
    assert bundle.task_names == ["topic", "same"] and bundle.manifest.tasks[0].labels == ["0", "1", "2"]
    assert [t.calibration_samples for t in bundle.manifest.tasks] == [24, 24]
    agreement = bundle.manifest.extra["head_agreement"]  # an expert equal to the backbone always agrees
    assert agreement["per_task"]["same"] == 1.0 and 0 <= agreement["per_task"]["topic"] <= 1
    assert agreement["mean"] == pytest.approx((1.0 + agreement["per_task"]["topic"]) / 2)
    capsys.readouterr()
    assert cli(["inspect", str(out)]) == 0
    assert f"agreement   {agreement['mean']:.3f} of calibration inputs" in capsys.readouterr().out
    # statistics equal those of the features computed directly
    zm = Backbone.from_pretrained(c["backbone"], max_length=128, device="cpu").encode(TEXTS).double()
    ze = Backbone.from_pretrained(c["linear"], max_length=128, device="cpu").encode(TEXTS).double()
    torch.testing.assert_close(bundle.statistics[0].B, ze.T @ zm, rtol=1e-4, atol=1e-4)
    check = bundle.manifest.expert_diagnostics  # heads are compared; without --base no distance is measured
    assert check is not None and check.task_vector_norms is None
    assert [p.tasks for p in check.head_pairs] == [("topic", "same")] and check.head_pairs[0].direction_cosine is None
    # an expert identical to the backbone needs no correction: W = I
    solver = CorrectionSolver(bundle.manifest.correction.beta).fit(bundle.statistics)
    torch.testing.assert_close(solver.task_corrections()[1], torch.eye(32, dtype=torch.float64), atol=1e-6, rtol=0)


def test_calibrate_with_a_sequence_classification_expert(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    c = checkpoints
    out = tmp_path / "bundle"
    assert cli(["calibrate", "--backbone", str(c["cls"]), "--expert", f"sentiment={c['cls']}",
                "--calibration", f"sentiment={c['root'] / 'b.txt'}", "--out", str(out), "--folds", "2",
                "--prior", "identity"]) == 0
    bundle = load_bundle(out)
    assert bundle.manifest.backbone.pooling == "pooler"
    correction = bundle.manifest.correction  # the prior asked for, with the CV curve recorded beside it
    assert correction.identity_weight == 1.0 and not correction.prior_selection["chosen"]
    assert correction.prior_selection["candidates"][-1] == 1.0
    assert bundle.manifest.tasks[0].labels == ["neg", "pos"]
    model = BertForSequenceClassification.from_pretrained(c["cls"]).eval()
    torch.testing.assert_close(bundle.heads[0].weight, model.classifier.weight.detach())
    # the bundle's representation + head reproduce the classifier's logits
    backbone = Backbone.from_pretrained(bundle.backbone_path, pooling="pooler", max_length=128, device="cpu")
    z = backbone.encode(TEXTS[:4])
    with torch.inference_mode():
        expected = model(**backbone.tokenize(TEXTS[:4])).logits
    torch.testing.assert_close(z @ bundle.heads[0].weight.T + bundle.heads[0].bias, expected, rtol=1e-4, atol=1e-5)


def test_calibrate_refuses_mismatches(checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = checkpoints
    other = make_tiny_backbone(tmp_path / "wide", hidden=48)
    out = tmp_path / "bundle"
    args = ["calibrate", "--backbone", str(c["backbone"]), "--out", str(out)]
    assert cli([*args, "--expert", f"w={other}", "--calibration", f"w={c['root'] / 'a.txt'}"]) == 2
    assert "hidden_size" in capsys.readouterr().err
    assert cli([*args, "--expert", f"topic={c['linear']}", "--calibration", f"other={c['root'] / 'a.txt'}"]) == 2
    assert "exactly the experts" in capsys.readouterr().err
    assert cli([*args, "--expert", f"bare={c['backbone']}", "--calibration", f"bare={c['root'] / 'a.txt'}"]) == 2
    assert "neither head.safetensors" in capsys.readouterr().err
    assert not out.exists()


def test_calibrate_with_base_records_the_experts_distances(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    c = checkpoints
    out = tmp_path / "bundle"
    assert cli(["calibrate", "--backbone", str(c["backbone"]), "--base", str(c["backbone"]),
                "--expert", f"topic={c['linear']}", "--expert", f"same={c['same']}",
                "--calibration", f"topic={c['root'] / 'a.txt'}", "--calibration", f"same={c['root'] / 'b.txt'}",
                "--out", str(out), "--folds", "3"]) == 0
    check = load_bundle(out).manifest.expert_diagnostics
    assert check is not None and check.task_vector_norms is not None
    base = AutoModel.from_pretrained(c["backbone"]).state_dict()
    expected = task_vector_norm(base, AutoModel.from_pretrained(c["linear"]).state_dict())
    assert check.task_vector_norms == pytest.approx({"topic": expected, "same": 0.0}, rel=1e-9)
    assert expected > 10


def test_calibrate_reads_a_csv_column_and_warns_below_the_dimension(
        checkpoints: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A CSV's named column only (not its header or labels); 24 inputs for d = 32 are not full rank: a warning."""
    c = checkpoints
    table = tmp_path / "cal.csv"
    table.write_text("label,body\n" + "".join(f'pos,"{t}"\n' for t in TEXTS))
    out = tmp_path / "bundle"
    args = ["calibrate", "--backbone", str(c["backbone"]), "--expert", f"topic={c['linear']}", "--folds", "2",
            "--out", str(out)]
    assert cli([*args, "--calibration", f"topic={table}"]) == 2  # the default column is `text`
    assert f"{table}:1: no column 'text' in the header row (has 'label', 'body')" in capsys.readouterr().err
    with caplog.at_level("WARNING"):
        assert cli([*args, "--calibration", f"topic={table}", "--text-column", "body"]) == 0
    assert ("task 'topic' has 24 calibration inputs for a 32-dimensional representation: the statistics need more "
            "inputs than dimensions to be full rank (at least 33") in caplog.text
    bundle = load_bundle(out)
    assert bundle.manifest.tasks[0].calibration_samples == 24
    zm = Backbone.from_pretrained(c["backbone"], max_length=128, device="cpu").encode(TEXTS).double()
    torch.testing.assert_close(bundle.statistics[0].A, zm.T @ zm, rtol=1e-4, atol=1e-4)


def test_calibrate_names_a_latin1_file_and_line_before_loading(checkpoints: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    c = checkpoints
    latin = tmp_path / "cal.txt"
    latin.write_bytes("first input\ncaf\u00e9 au lait\n".encode("latin-1"))
    out = tmp_path / "bundle"
    assert cli(["calibrate", "--backbone", str(c["backbone"]), "--expert", f"topic={c['linear']}",
                "--calibration", f"topic={latin}", "--out", str(out)]) == 2
    assert f"calibrate failed: {latin}:2: not UTF-8 (byte 0xe9 at byte 4 of the line); files must be UTF-8" in \
        capsys.readouterr().err
    assert not out.exists()
