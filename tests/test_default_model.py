"""benchmarks/check_default_model.py, which `make serve` runs after building the default bundle, on a small
random bundle with the default suite's tasks: its answers are the engine's, its verdict follows them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from reprmerge_core.data import DEFAULT_SUITE, SUITES
from reprmerge_core.data.sources import SOURCES
from service.engine import Engine
from tests.helpers import make_random_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from check_default_model import EXAMPLES, check, main


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> Path:
    tasks = {t: list(SOURCES[t].labels) for t in SUITES[DEFAULT_SUITE].tasks}
    return make_random_bundle(tmp_path_factory.mktemp("default") / "bundle", tiny_backbone_dir,
                              torch.Generator().manual_seed(3), tasks=tasks)


def test_examples_cover_the_default_suite_with_its_labels() -> None:
    assert list(EXAMPLES) == list(SUITES[DEFAULT_SUITE].tasks)
    for task, examples in EXAMPLES.items():
        assert len(examples) >= 4 and {label for _, label in examples} <= set(SOURCES[task].labels)


def test_answers_are_the_explicit_correction_and_the_exit_code_follows_them(bundle: Path) -> None:
    engine = Engine.load(bundle, device="cpu")
    report = check(engine)
    rows = report["rows"]
    texts = [text for examples in EXAMPLES.values() for text, _ in examples]
    assert len(rows) == (1 + len(EXAMPLES)) * len(texts)
    z = engine.encode(texts).double()
    for name, pref in [("equal", [1.0, 1.0, 1.0])] + [(f"one-hot {t}", [float(t == s) for s in engine.tasks])
                                                        for t in engine.tasks]:
        W = engine.folder.solver.solve(torch.tensor([pref], dtype=torch.float64))[0]
        mine = [r for r in rows if r["preference"] == name]
        for i, row in enumerate(mine):
            t = engine.tasks.index(row["task"])
            head = engine.bundle.heads[t]
            probs = ((z[i] @ W.T) @ head.weight.double().T + head.bias.double()).softmax(-1)
            assert row["label"] == engine.labels[row["task"]][int(probs.argmax())]
            assert row["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
            assert row["right"] == (row["label"] == row["expected"])
            assert (row["quality_kept"] == 1.0) if name == f"one-hot {row['task']}" else 0 <= row["quality_kept"] <= 1
    own = sum(r["right"] for r in rows if r["preference"] == f"one-hot {r['task']}")
    assert report["one_hot_right"] == own
    assert main([str(bundle)]) == (0 if own == len(texts) else 1)


def test_a_bundle_without_the_tasks_is_refused(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    other = make_random_bundle(tmp_path / "b", tiny_backbone_dir, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no task sms_spam, trec6, movie_sentiment"):
        check(Engine.load(other, device="cpu"))
