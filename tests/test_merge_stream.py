"""Streamed checkpoint merges (one tensor at a time from safetensors) against the in-memory merge of the same
checkpoints loaded whole; the safetensors writer; per-expert weights and the merge record through to `inspect`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BertConfig, BertModel

from reprmerge_cli import main
from reprmerge_core.merging import REPORT_FILE, collect_grams, merge_checkpoints, merge_state_dicts, text_batches
from reprmerge_core.merging.calibration import linear_layers
from reprmerge_core.merging.stream import SafetensorsFile, write_checkpoint
from tests.test_merge_cli import TEXTS, copy_tokenizer, make_expert, merge_args, state


@pytest.fixture(scope="module")
def experts(tiny_backbone_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three experts: one saved with a classification head (`bert.` prefix), one sharded over several files."""
    root = tmp_path_factory.mktemp("stream_experts")
    sharded = make_expert(tiny_backbone_dir, root / "trec", 2)
    BertModel.from_pretrained(sharded).save_pretrained(sharded, max_shard_size="20KB")
    (sharded / "model.safetensors").unlink(missing_ok=True)
    assert (sharded / "model.safetensors.index.json").is_file()
    return {
        "spam": make_expert(tiny_backbone_dir, root / "spam", 1, with_head=True),
        "trec": sharded,
        "movie": make_expert(tiny_backbone_dir, root / "movie", 3),
    }


def whole(base: Path, experts: dict[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    return state(base), {task: state(path) for task, path in experts.items()}


@pytest.mark.parametrize(
    ("method", "params", "weights"),
    [
        ("ties", {"density": 0.4}, {"spam": 0.5, "trec": 2.0}),
        ("dare", {"drop_rate": 0.3, "combine": "ties", "seed": 5}, {"movie": -1.0}),
        ("breadcrumbs", {"density": 0.6, "gamma": 0.05}, {"spam": 0.2, "trec": 0.3, "movie": 0.5}),
    ],
)
def test_streamed_cli_merge_equals_the_in_memory_merge_bit_for_bit(
    tiny_backbone_dir: Path, experts: dict[str, Path], tmp_path: Path, method: str, params: dict, weights: dict
) -> None:
    out = tmp_path / "merged"
    flags = [arg for k, v in params.items() for arg in ("--set", f"{k}={v}")]
    flags += [arg for task, w in weights.items() for arg in ("--weight", f"{task}={w}")]
    assert main(merge_args(tiny_backbone_dir, experts, out, method, *flags)) == 0
    base, states = whole(tiny_backbone_dir, experts)
    reference = merge_state_dicts(base, states, method, params, weights=weights)
    merged = state(out)
    assert list(merged) == list(base)
    for name, value in reference.state_dict.items():
        assert torch.equal(merged[name], value), name
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["params"] == reference.report.params and all(report["params"][k] == v for k, v in params.items())
    assert report["weights"] == {"spam": 1.0, "trec": 1.0, "movie": 1.0, **weights}
    assert report["merged_parameters"] == reference.report.merged_parameters


def test_streamed_regmean_equals_the_in_memory_merge(
    tiny_backbone_dir: Path, experts: dict[str, Path], tmp_path: Path
) -> None:
    texts = {task: TEXTS[i:] for i, task in enumerate(experts)}
    result = merge_checkpoints(tiny_backbone_dir, experts, "regmean", {"alpha": 0.8}, texts, tmp_path / "out")
    base, states = whole(tiny_backbone_dir, experts)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    model = BertModel.from_pretrained(tiny_backbone_dir)
    layers = list(linear_layers(model))
    grams = {
        task: collect_grams(BertModel.from_pretrained(path), text_batches(tokenizer, texts[task]), layers)
        for task, path in experts.items()
    }
    reference = merge_state_dicts(base, states, "regmean", {"alpha": 0.8}, grams)
    for name, value in reference.state_dict.items():
        assert torch.equal(result.state_dict[name], value), name  # read back lazily from the written file
    assert result.report.rho == pytest.approx(reference.report.rho, rel=1e-12)


def test_an_expert_missing_an_encoder_parameter_is_refused(
    tiny_backbone_dir: Path, experts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """AutoModel used to fill a missing pooler with random weights, and the merge averaged them in silently."""
    bare = tmp_path / "bare"
    BertModel(BertConfig.from_pretrained(tiny_backbone_dir), add_pooling_layer=False).save_pretrained(bare)
    copy_tokenizer(tiny_backbone_dir, bare)
    out = tmp_path / "never"
    assert main(merge_args(tiny_backbone_dir, {**experts, "bare": bare}, out, "task_arithmetic")) == 2
    assert "expert 'bare' lacks parameters: pooler.dense.bias, pooler.dense.weight" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--weight", "sms=0.5"], "weights given for unknown experts ['sms']"),
        (["--weight", "spam=high"], "--weight spam=high: the weight must be a number"),
        (["--weight", "spam=1", "--weight", "spam=2"], "--weight names must be unique"),
    ],
)
def test_bad_weights_are_refused_before_loading(
    tiny_backbone_dir: Path, experts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    flags: list[str], message: str,
) -> None:
    assert main(merge_args(tiny_backbone_dir, experts, tmp_path / "x", "ties", *flags)) == 2
    assert message in capsys.readouterr().err


def test_writer_round_trips_every_dtype_and_checks_the_order(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=gen),
        "b": torch.randn(7, generator=gen, dtype=torch.float64),
        "c": torch.randn(2, 2, generator=gen).to(torch.bfloat16),
        "d": torch.arange(6).reshape(2, 3),
        "e": torch.tensor(2.5, dtype=torch.float16),
        "f": torch.tensor([True, False, True]),
        "g": torch.empty(0, 3),
    }
    names = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.int64: "I64",
             torch.float16: "F16", torch.bool: "BOOL"}
    entries = {k: (names[v.dtype], tuple(v.shape)) for k, v in tensors.items()}
    write_checkpoint(tmp_path / "x.safetensors", entries, iter(tensors.items()))
    loaded = load_file(tmp_path / "x.safetensors")
    assert list(loaded) == list(tensors) and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    ours = SafetensorsFile(tmp_path / "x.safetensors")  # the merge's reader
    assert all(torch.equal(ours.read(k), v) and ours.read(k).dtype == v.dtype for k, v in tensors.items())
    save_file(tensors, str(tmp_path / "ref.safetensors"))  # the library's own writer reads back the same
    assert all(torch.equal(load_file(tmp_path / "ref.safetensors")[k], loaded[k]) for k in tensors)
    with pytest.raises(ValueError, match=r"tensor g torch.float32 \(0, 3\) does not match the header entry a F32"):
        write_checkpoint(tmp_path / "y.safetensors", entries, iter(list(tensors.items())[::-1]))


def test_calibrated_bundle_records_the_merge_and_inspect_shows_it(
    tiny_backbone_dir: Path, experts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`inspect` showed "merge ties {}" for bundles calibrated on a `reprmerge merge` output."""
    two = {name: Path(shutil.copytree(experts[name], tmp_path / name)) for name in ("trec", "movie")}
    gen = torch.Generator().manual_seed(9)
    for path in two.values():  # a linear head each, reading the mean-pooled representation
        save_file({"weight": torch.randn(2, 32, generator=gen), "bias": torch.zeros(2)}, str(path / "head.safetensors"))
    merged = tmp_path / "merged"
    assert main(merge_args(tiny_backbone_dir, two, merged, "ties", "--weight", "trec=0.25")) == 0
    (tmp_path / "cal.txt").write_text("\n".join(TEXTS * 2) + "\n")
    bundle = tmp_path / "bundle"
    args = ["calibrate", "--backbone", str(merged), "--out", str(bundle), "--folds", "2"]
    for name, path in two.items():
        args += ["--expert", f"{name}={path}", "--calibration", f"{name}={tmp_path / 'cal.txt'}"]
    assert main([*args, "--merge-method", "dare"]) == 2  # contradicts the merge report, refused up front
    assert "--merge-method 'dare' contradicts" in capsys.readouterr().err
    assert main(args) == 0
    capsys.readouterr()
    assert main(["inspect", str(bundle)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("merge "))
    assert line == ('merge       ties {"density": 0.2, "freeze": [], "lam": 1.0}  weights: trec 0.25, movie 1')
