"""Expert heads by allow-list: each supported architecture, built from a tiny random config offline, is read
so that representation + head reproduce the model's own logits; anything else is refused by name."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertTokenizerFast,
    PreTrainedModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from reprmerge_cli import main as cli
from reprmerge_core.backbone import Backbone, default_backbone_path
from reprmerge_core.bundle import load_bundle
from reprmerge_core.experts import SUPPORTED, read_expert
from tests.helpers import TOKENIZER_FILES

TEXTS = ["free entry to win a prize now", "are we still meeting at noon?", "a dull , lifeless film",
         "who wrote hamlet", "call me when you land", "an utterly charming story"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _vocab() -> int:
    return sum(1 for _ in (default_backbone_path() / "vocab.txt").open())


# architecture -> (a tiny random classifier, the dotted name of the Linear that produces the logits)
BUILDERS: dict[str, tuple[Callable[[], PreTrainedModel], str]] = {
    "BertForSequenceClassification": (
        lambda: BertForSequenceClassification(BertConfig(vocab_size=_vocab(), num_labels=3, **SMALL)), "classifier"),
    "RobertaForSequenceClassification": (
        lambda: RobertaForSequenceClassification(RobertaConfig(vocab_size=_vocab(), max_position_embeddings=130,
                                                               num_labels=3, **SMALL)), "classifier.out_proj"),
    "DistilBertForSequenceClassification": (
        lambda: DistilBertForSequenceClassification(DistilBertConfig(vocab_size=_vocab(), dim=32, n_layers=2, n_heads=2,
                                                                     hidden_dim=64, num_labels=2)), "classifier"),
    "DebertaV2ForSequenceClassification": (
        lambda: DebertaV2ForSequenceClassification(DebertaV2Config(vocab_size=_vocab(), max_position_embeddings=128,
                                                                   pooler_hidden_act="gelu", num_labels=3, **SMALL)),
        "classifier"),
}


def save_classifier(model: PreTrainedModel, out: Path, seed: int) -> Path:
    """Every parameter re-drawn (biases too, so no stage is the identity by chance), saved as safetensors with
    a tokenizer of the model's kind (DistilBERT's takes no token_type_ids)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out, safe_serialization=True)
    src = default_backbone_path()
    if isinstance(model, DistilBertForSequenceClassification):
        DistilBertTokenizerFast.from_pretrained(src).save_pretrained(out)
    else:
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy(src / name, out / name)
    return out


def head_input_and_logits(path: Path, linear: str, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own logits and what its final Linear reads (captured by a hook: independent of our table)."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    seen: list[torch.Tensor] = []
    model.get_submodule(linear).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    backbone = Backbone.from_pretrained(path, device="cpu", max_length=64)
    with torch.inference_mode():
        logits = model(**backbone.tokenize(texts)).logits
    return seen[0], logits


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classifiers")
    return {arch: save_classifier(build(), root / arch, seed)
            for seed, (arch, (build, _)) in enumerate(BUILDERS.items())}


def test_every_supported_architecture_has_a_test() -> None:
    assert set(BUILDERS) == set(SUPPORTED)


@pytest.mark.parametrize("architecture", sorted(BUILDERS))
def test_reader_reproduces_the_models_own_logits(classifiers: dict[str, Path], architecture: str) -> None:
    path = classifiers[architecture]
    source = read_expert("task", path, "mean")  # the pooling given is for head.safetensors experts only
    assert source.pooling == SUPPORTED[architecture].pooling
    z = source.backbone(max_length=64, device="cpu").encode(TEXTS)
    reads, logits = head_input_and_logits(path, BUILDERS[architecture][1], TEXTS)
    torch.testing.assert_close(z, reads, rtol=0, atol=1e-5)
    torch.testing.assert_close(z @ source.head.weight.T + source.head.bias, logits, rtol=0, atol=1e-5)
    assert logits.std() > 0.1  # random weights of scale 0.5: logits far apart, so a misread head cannot pass


def test_calibrate_reads_a_distilbert_expert_where_its_head_reads(classifiers: dict[str, Path], tmp_path: Path) -> None:
    """The issue's case: a DistilBERT head read from [CLS] (before pre_classifier + ReLU) gave other logits."""
    expert = classifiers["DistilBertForSequenceClassification"]
    merged = tmp_path / "merged"  # a merged encoder: the expert's encoder alone, moved a little
    model = DistilBertForSequenceClassification.from_pretrained(expert).distilbert
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    model.save_pretrained(merged)
    DistilBertTokenizerFast.from_pretrained(expert).save_pretrained(merged)
    (tmp_path / "inputs.txt").write_text("\n".join(TEXTS * 2) + "\n")
    out = tmp_path / "bundle"
    assert cli(["calibrate", "--backbone", str(merged), "--expert", f"sst={expert}", "--calibration",
                f"sst={tmp_path / 'inputs.txt'}", "--out", str(out), "--folds", "2", "--device", "cpu"]) == 0
    bundle = load_bundle(out)
    assert bundle.manifest.backbone.pooling == "cls"
    assert bundle.manifest.extra["head_agreement"] is None  # the head reads the stage output, not [CLS]: not comparable
    zm = Backbone.from_pretrained(merged, pooling="cls", device="cpu").encode(TEXTS * 2).double()
    ze, logits = head_input_and_logits(expert, "classifier", TEXTS * 2)
    torch.testing.assert_close(bundle.statistics[0].B, ze.double().T @ zm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ze @ bundle.heads[0].weight.T + bundle.heads[0].bias, logits, rtol=0, atol=1e-5)


def test_other_architectures_are_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = save_classifier(AlbertForSequenceClassification(
        AlbertConfig(vocab_size=_vocab(), embedding_size=16, num_labels=2, **SMALL)), tmp_path / "albert", 0)
    with pytest.raises(ValueError, match="architecture AlbertForSequenceClassification is not supported") as err:
        read_expert("spam", path, "mean")
    assert "expert 'spam'" in str(err.value) and all(name in str(err.value) for name in SUPPORTED)
    assert "head.safetensors" in str(err.value)
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    assert cli(["calibrate", "--backbone", str(path), "--expert", f"spam={path}", "--calibration",
                f"spam={tmp_path / 'texts.txt'}", "--out", str(tmp_path / "bundle"), "--folds", "2"]) == 2
    assert "AlbertForSequenceClassification is not supported" in capsys.readouterr().err


def test_a_head_file_beside_any_encoder_is_read_with_the_given_pooling(classifiers: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    path = shutil.copytree(classifiers["RobertaForSequenceClassification"], tmp_path / "roberta")
    weights = load_file(str(path / "model.safetensors"))
    save_file({"weight": weights["classifier.out_proj.weight"], "bias": weights["classifier.out_proj.bias"]},
              str(path / "head.safetensors"))
    source = read_expert("task", path, "mean")  # head.safetensors wins: the user states the representation
    assert source.pooling == "mean" and source.stage is None
    torch.testing.assert_close(source.head.weight, weights["classifier.out_proj.weight"])


def test_evaluate_compares_with_a_distilbert_expert_through_its_whole_head(
    classifiers: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Labels are the expert's own predictions: read where its head reads, the expert (and task arithmetic at
    the one-hot preference, which is the expert again) scores 1.0."""
    texts = [f"{t} {i}" for i in range(4) for t in TEXTS]
    source = classifiers["DistilBertForSequenceClassification"]
    _, logits = head_input_and_logits(source, "classifier", texts)
    model = DistilBertForSequenceClassification.from_pretrained(source)
    with torch.no_grad():  # a bias that splits the inputs between the two classes
        model.classifier.bias[1] += float((logits[:, 0] - logits[:, 1]).median()) + 1e-3
    expert, base = tmp_path / "expert", tmp_path / "base"
    model.save_pretrained(expert)
    model.distilbert.save_pretrained(base)
    for out in (expert, base):
        DistilBertTokenizerFast.from_pretrained(source).save_pretrained(out)
    _, logits = head_input_and_logits(expert, "classifier", texts)
    labels = logits.argmax(1).tolist()
    assert 0 < sum(labels) < len(labels)  # both classes occur: accuracy 1.0 is not a majority vote
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                                 for t, y in zip(texts, labels)))
    (tmp_path / "inputs.txt").write_text("\n".join(texts) + "\n")
    bundle = tmp_path / "bundle"
    tasks = ("a", "b")  # the same expert twice: evaluation needs two tasks
    assert cli(["calibrate", "--backbone", str(base), "--out", str(bundle), "--folds", "2", "--device", "cpu",
                *[f"--{option}={t}={path}" for t in tasks
                  for option, path in (("expert", expert), ("calibration", tmp_path / "inputs.txt"))]]) == 0
    assert cli(["evaluate", str(bundle), "--out", str(tmp_path / "report"), "--base", str(base), "--device", "cpu",
                *[f"--{option}={t}={path}" for t in tasks
                  for option, path in (("expert", expert), ("test", tmp_path / "test.jsonl"))]]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["experts"]["accuracy"] == [1.0, 1.0], report["experts"]
    assert report["grid"]["task_arithmetic"]["normalised"] == [[1.0, 1.0]] * 5
