"""`reprmerge export --format onnx`: a standalone model onnxruntime runs without reprmerge, equal to the service."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reprmerge_cli import main as cli
from reprmerge_core.preference import canonical_preference
from service.engine import Engine, HeadGroup
from service.settings import ServiceSettings
from tests.helpers import make_random_bundle

# Lengths differ (padding in one batch), and the last text is longer than the bundle's max_length (truncation).
TEXTS = ["a fine day", "win a free prize now, claim your cash", "what is the capital of peru?", "ok",
         "a very long message " * 20]
PREFERENCE = {"alpha": 2, "gamma": 1}

# Run by a separate interpreter that never imports reprmerge: only onnxruntime and a standard tokenizer.
STANDALONE = """
import json, sys
import numpy as np, onnxruntime
from transformers import AutoTokenizer
out, texts = sys.argv[1], json.loads(sys.argv[2])
info = json.load(open(f"{out}/export.json"))
tokenizer = AutoTokenizer.from_pretrained(out)
session = onnxruntime.InferenceSession(f"{out}/{info['model']}", providers=["CPUExecutionProvider"])
batch = tokenizer(texts, padding=True, truncation=True, return_tensors="np")
feed = {name: batch[name].astype(np.int64) for name in info["inputs"]}
single = [session.run(None, {k: v[i:i + 1, :int(batch["attention_mask"][i].sum())] for k, v in feed.items()})
          for i in range(len(texts))]
logits = session.run([o["name"] for o in info["outputs"]], feed)
assert not any(m.startswith("reprmerge") for m in sys.modules)
print(json.dumps({"batch": [x.tolist() for x in logits],
                  "single": [[x[0].tolist() for x in row] for row in single]}))
"""


@pytest.fixture(scope="module", params=["mean", "pooler"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             tiny_backbone_dir: Path) -> tuple[Path, Path]:
    """A bundle (mean pooling, or the BERT pooler a sequence classifier reads) exported at PREFERENCE."""
    root = tmp_path_factory.mktemp("export")
    bundle = make_random_bundle(root / "bundle", tiny_backbone_dir, torch.Generator().manual_seed(7),
                                pooling=request.param)
    out = root / "onnx"
    assert cli(["export", str(bundle), "--preference", json.dumps(PREFERENCE), "--format", "onnx",
                "--out", str(out)]) == 0
    return bundle, out


def test_onnx_export_answers_as_the_service(exported: tuple[Path, Path]) -> None:
    bundle, out = exported
    info = json.loads((out / "export.json").read_text())
    assert [o["name"] for o in info["outputs"]] == ["logits_alpha", "logits_beta", "logits_gamma"]
    assert info["preference"] == pytest.approx({"alpha": 2 / 3, "beta": 0.0, "gamma": 1 / 3})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", STANDALONE, str(out), json.dumps(TEXTS)], cwd=out, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    got = [np.array(x) for x in answer["batch"]]

    # The service's engine, with the service's default solve precision, on the same texts and preference.
    engine = Engine.load(bundle, device="cpu", solve_dtype=ServiceSettings.model_fields["solve_dtype"].default)
    pref = canonical_preference(PREFERENCE, engine.tasks)
    head = engine.fold([pref])[0]
    z = engine.encode(TEXTS)
    logits = z @ head.weight.T + engine.folder.bias
    for task, g in zip(engine.tasks, got, strict=True):
        np.testing.assert_allclose(g, logits[:, engine.slices[task]].numpy(), rtol=1e-4, atol=1e-4)
    probs = engine.apply(z, [HeadGroup(head, range(len(TEXTS)))])[0].numpy()
    softmax = np.concatenate([np.exp(g) / np.exp(g).sum(axis=1, keepdims=True) for g in got], axis=1)
    np.testing.assert_allclose(softmax, probs, atol=1e-5)
    # dynamic axes: each text alone, unpadded, gives its row of the padded batch
    for i, row in enumerate(answer["single"]):
        for t, g in enumerate(got):
            np.testing.assert_allclose(row[t], g[i], rtol=1e-4, atol=1e-4)
    # the preference is folded in: another preference gives other logits
    other = engine.fold([canonical_preference({"beta": 1}, engine.tasks)])[0]
    assert not torch.allclose(z @ other.weight.T, z @ head.weight.T, atol=1e-2)


def test_export_refuses_bad_input_before_writing(exported: tuple[Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bundle, out = exported
    target = tmp_path / "out"
    cases = [
        (["--preference", '{"zeta": 1}'], "preference.zeta: unknown task"),
        (["--preference", '{"alpha": -1}'], "preference.alpha: weight must be non-negative"),
        (["--preference", "[1, 2]"], "expected 3 weights"),
        (["--preference", "{alpha: 1"], "--preference must be JSON"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) if "JSON" in message else contextlib.nullcontext():  # argparse exits
            assert cli(["export", str(bundle), *extra, "--out", str(target)]) == 2
        assert message in capsys.readouterr().err
        assert not target.exists()
    before = (out / "model.onnx").stat().st_mtime_ns
    assert cli(["export", str(bundle), "--preference", "[1, 1, 1]", "--out", str(out)]) == 2
    assert "exists; add --overwrite" in capsys.readouterr().err and (out / "model.onnx").stat().st_mtime_ns == before
    assert cli(["export", str(bundle), "--preference", "[1, 1, 1]", "--out", str(bundle / "onnx")]) == 2
    assert "overlaps the bundle" in capsys.readouterr().err and not (bundle / "onnx").exists()

