"""Mistakes at the boundary get clear errors before any work, in every command: a mistyped path names itself
and its option (never a Hugging Face Hub error), task names follow one rule, pickle weights are refused with
the one-line conversion to safetensors (which works)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from reprmerge_cli import main as cli
from reprmerge_core.bundle import load_bundle
from reprmerge_core.checks import checkpoint_dir
from tests.helpers import TOKENIZER_FILES
from tests.test_merge_cli import make_expert, with_head

TEXTS = [f"an input sentence about topic {i} and more {i % 3}" for i in range(12)]
BAD_NAMES = ["my task", "café"]


@pytest.fixture(scope="module")
def user(tiny_backbone_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A sequence-classification expert (safetensors) and the same expert as pickle weights only."""
    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    expert = root / "expert"
    BertForSequenceClassification(BertConfig.from_pretrained(tiny_backbone_dir, num_labels=2)).save_pretrained(expert)
    for name in TOKENIZER_FILES:
        if (tiny_backbone_dir / name).exists():
            shutil.copy(tiny_backbone_dir / name, expert / name)
    pickled = shutil.copytree(expert, root / "pickled")
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    return {"root": root, "expert": expert, "pickled": pickled, "base": tiny_backbone_dir}


def _merge(base: Path, name: str, expert: Path, out: Path) -> list[str]:
    return ["merge", "--base", str(base), "--expert", f"{name}={expert}", "--method", "ties", "--out", str(out)]


def _calibrate(backbone: Path, name: str, expert: Path, texts: Path, out: Path) -> list[str]:
    return ["calibrate", "--backbone", str(backbone), "--expert", f"{name}={expert}",
            "--calibration", f"{name}={texts}", "--out", str(out), "--folds", "2", "--device", "cpu"]


def test_a_mistyped_path_is_named_with_its_option_never_as_a_hub_error(
    user: dict[str, Path], random_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    typo = user["root"] / "expertt"
    texts = user["root"] / "texts.txt"
    relative = Path("experts/sms")  # a relative path used to reach the Hub as a repo id
    cases = [
        (_merge(user["base"], "sms", typo, tmp_path / "m"), f"--expert sms={typo}: {typo} does not exist"),
        (_merge(user["base"], "sms", relative, tmp_path / "m"), f"--expert sms={relative}: {relative} does not exist"),
        (_merge(typo, "sms", user["expert"], tmp_path / "m"), f"--base: {typo} does not exist"),
        (_calibrate(user["base"], "sms", typo, texts, tmp_path / "b"), f"--expert sms={typo}: {typo} does not exist"),
        (_calibrate(typo, "sms", user["expert"], texts, tmp_path / "b"), f"--backbone: {typo} does not exist"),
        ([*_calibrate(user["base"], "sms", user["expert"], texts, tmp_path / "b"), "--base", str(typo)],
         f"--base: {typo} does not exist"),
        (_calibrate(user["base"], "sms", texts, texts, tmp_path / "b"), f"{texts} is a file, not a checkpoint"),
        (_calibrate(user["base"], "sms", user["root"], texts, tmp_path / "b"), "no config.json"),
        (["evaluate", str(random_bundle), "--out", str(tmp_path / "r"), "--test", f"alpha={texts}",
          "--expert", f"alpha={typo}"], f"--expert alpha={typo}: {typo} does not exist"),
    ]
    for args, message in cases:
        assert cli(args) == 2, args
        err = capsys.readouterr().err
        assert message in err, err
        assert "huggingface" not in err.lower() and "repo id" not in err.lower(), err
    assert not any((tmp_path / name).exists() for name in ("m", "b", "r"))


def test_task_names_follow_one_rule_in_every_command(
    user: dict[str, Path], random_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """calibrate refused these only after its statistics pass (with a raw pydantic dump); merge accepted them."""
    missing = user["root"] / "no-such-inputs.txt"  # refused before the inputs are even read
    for name in BAD_NAMES:
        rule = f"task name {name!r} may only use ASCII letters, digits, '_', '.' and '-'"
        for args in (
            _merge(user["base"], name, user["expert"], tmp_path / "m"),
            _calibrate(user["base"], name, user["expert"], missing, tmp_path / "b"),
            ["build", "--tasks", f"sst2,{name}", "--out", str(tmp_path / "x")],
            ["evaluate", str(random_bundle), "--out", str(tmp_path / "r"), "--test", f"{name}={missing}"],
        ):
            assert cli(args) == 2, args
            err = capsys.readouterr().err
            assert rule in err and "validation error" not in err, err
    assert not any((tmp_path / name).exists() for name in ("m", "b", "x", "r"))


def test_pickle_weights_are_refused_everywhere_with_a_conversion_that_works(
    user: dict[str, Path], random_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    pickled, texts = user["pickled"], user["root"] / "texts.txt"
    for args in (
        _merge(user["base"], "sms", pickled, tmp_path / "m"),  # merge used to unpickle it silently
        _merge(pickled, "sms", user["expert"], tmp_path / "m"),
        _calibrate(user["base"], "sms", pickled, texts, tmp_path / "b"),
        ["evaluate", str(random_bundle), "--out", str(tmp_path / "r"), "--test", f"alpha={texts}",
         "--expert", f"alpha={pickled}"],
    ):
        assert cli(args) == 2, args
        err = capsys.readouterr().err
        assert "pickle weights (pytorch_model.bin)" in err and "never loads" in err, err
    assert not any((tmp_path / name).exists() for name in ("m", "b", "r"))

    command = err.strip().splitlines()[-1].strip()  # the one line the message gives
    assert command.startswith("python -c ")
    subprocess.run([sys.executable, *shlex.split(command)[1:]], check=True, timeout=120)
    converted = AutoModelForSequenceClassification.from_pretrained(pickled, use_safetensors=True).state_dict()
    original = AutoModelForSequenceClassification.from_pretrained(user["expert"]).state_dict()
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)
    assert cli(_calibrate(user["base"], "sms", pickled, texts, tmp_path / "b")) == 0


def test_calibrate_refuses_an_expert_far_from_the_base_unless_forced(
    user: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """With --base, an expert 100x farther from it than its peers (not fine-tuned from it) used to pass silently."""
    base = user["base"]
    experts = {name: with_head(make_expert(base, tmp_path / name, seed, scale=scale), head_seed=10 + seed)
               for name, seed, scale in (("sms", 1, 0.05), ("movie", 2, 0.05), ("stray", 3, 5.0))}
    args = ["calibrate", "--backbone", str(base), "--base", str(base), "--out", str(tmp_path / "bundle"),
            "--folds", "2", "--device", "cpu"]
    for name, path in experts.items():
        args += ["--expert", f"{name}={path}", "--calibration", f"{name}={user['root'] / 'texts.txt'}"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "expert 'stray' is" in err and "as far from the base as the median of its peers" in err, err
    assert "--force" in err and "statistics" not in err and not (tmp_path / "bundle").exists()  # before any pass
    assert cli([*args, "--force"]) == 0
    check = load_bundle(tmp_path / "bundle").manifest.expert_diagnostics
    assert check is not None and check.norm_ratios["stray"] > 50 and any("stray" in w for w in check.warnings)


def test_sharded_pickle_weights_get_a_conversion_that_works(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=1, intermediate_size=8))
    path = tmp_path / "sharded"
    model.save_pretrained(path)
    weights = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    keys = sorted(weights)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: weights[k] for k in part}, path / name)
        weight_map.update(dict.fromkeys(part, name))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError, match="pickle weights") as err:
        checkpoint_dir(path, "--expert x")
    command = str(err.value).splitlines()[-1].strip()
    subprocess.run([sys.executable, *shlex.split(command)[1:]], check=True, timeout=120, cwd=tmp_path)
    assert checkpoint_dir(path, "--expert x") == path
    converted = BertForSequenceClassification.from_pretrained(path, use_safetensors=True).state_dict()
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())
