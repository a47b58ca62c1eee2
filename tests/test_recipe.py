"""`reprmerge build --config recipe.yaml`: one command from tiny local experts to a bundle, errors by YAML path,
and a mergekit file's merge mapped onto reprmerge's methods."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import BertModel

from reprmerge_cli import main as cli
from reprmerge_core.bundle import load_bundle
from reprmerge_core.merging import merge_checkpoints, merge_state_dicts
from reprmerge_core.merging.mergekit import MergekitError, map_mergekit
from reprmerge_core.pipeline.recipe import RecipeError, build_from_recipe
from tests.helpers import TOKENIZER_FILES

TEXTS = [f"an input sentence about topic {i} and more {i % 3}" for i in range(24)]


def make_expert(base: Path, out: Path, seed: int, labels: list[str]) -> Path:
    """The base nudged as fine-tuning would (small changes to every encoder layer), with a linear head."""
    g = torch.Generator().manual_seed(seed)
    model = BertModel.from_pretrained(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("encoder."):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (base / name).exists():
            shutil.copy(base / name, out / name)
    d = model.config.hidden_size
    save_file({"weight": torch.randn(len(labels), d, generator=g), "bias": torch.randn(len(labels), generator=g)},
              str(out / "head.safetensors"))
    (out / "expert.json").write_text(json.dumps({"labels": labels}))
    return out


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> Path:
    """A user's folder: base, two experts, their calibration files (text and JSON lines)."""
    root = tmp_path_factory.mktemp("recipe")
    shutil.copytree(tiny_backbone_dir, root / "base")
    make_expert(root / "base", root / "spam", 1, ["ham", "spam"])
    make_expert(root / "base", root / "topic", 2, ["sport", "food", "tech"])
    pickled = shutil.copytree(root / "spam", root / "pickled")  # the spam expert with pickle weights only
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    (root / "spam.txt").write_text("\n".join(TEXTS) + "\n")
    (root / "topic.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in reversed(TEXTS)) + "\n")
    return root


def recipe(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "base": "base",
        "experts": [{"name": "spam", "path": "spam"}, {"name": "topic", "path": "topic"}],
        "merge": {"method": "ties", "parameters": {"density": 0.5}},
        "calibration": {"spam": "spam.txt", "topic": "topic.jsonl"},
        "correction": {"beta": 0.5, "prior": "identity", "folds": 2},
        "max_length": 32,
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
    }
    return {**base, **changes}


def write(root: Path, name: str, content: dict[str, object] | str) -> Path:
    path = root / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def test_recipe_builds_what_merge_then_calibrate_build(user: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    weighted = [{"name": "spam", "path": "spam"}, {"name": "topic", "path": "topic", "weight": 0.5}]
    config = write(user, "recipe.yaml", recipe(experts=weighted))
    out = tmp_path / "bundle"
    assert cli(["build", "--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m.task_names == ["spam", "topic"] and m.tasks[1].labels == ["sport", "food", "tech"]
    assert m.merge.method == "ties" and m.merge.parameters == {"density": 0.5, "lam": 1.0, "freeze": []}
    assert m.merge.weights == {"spam": 1.0, "topic": 0.5}
    assert m.correction.beta == 0.5 and m.correction.identity_weight == 1.0
    recorded = m.extra["build_recipe"]
    assert recorded["file"] == str(config.resolve()) and recorded["recipe"]["experts"][0]["path"] == str(user / "spam")
    assert m.expert_diagnostics is not None and set(m.expert_diagnostics.task_vector_norms) == {"spam", "topic"}
    assert "sentence-transformers/all-MiniLM-L6-v2" in (out / "README.md").read_text()

    # the same two steps by hand: merge, then calibrate, give the same backbone and statistics
    merged = tmp_path / "merged"
    merge_checkpoints(user / "base", {"spam": user / "spam", "topic": user / "topic"}, "ties", {"density": 0.5},
                      None, merged, weights={"topic": 0.5})
    ours, theirs = load_file(str(out / "backbone" / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    by_hand = tmp_path / "by_hand"
    assert cli(["calibrate", "--backbone", str(merged), "--base", str(user / "base"),
                "--expert", f"spam={user / 'spam'}", "--expert", f"topic={user / 'topic'}",
                "--calibration", f"spam={user / 'spam.txt'}", "--calibration", f"topic={user / 'topic.jsonl'}", "--beta", "0.5", "--prior", "identity",
                "--folds", "2", "--max-length", "32", "--device", "cpu", "--out", str(by_hand)]) == 0
    for a, b in zip(bundle.statistics, load_bundle(by_hand).statistics):
        torch.testing.assert_close(a.A, b.A)
        torch.testing.assert_close(a.B, b.B)

    capsys.readouterr()
    assert cli(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"recipe      {config.resolve()} (sha256 " in printed
    assert 'merge ties {"density": 0.5}' in printed and f"spam={user / 'spam'}" in printed


BAD = [
    # (name, recipe or raw YAML, message the error starts with)
    ("missing expert folder", recipe(experts=[{"name": "spam", "path": "spam"}, {"name": "topic", "path": "nope"}]),
     "experts[1].path: "),
    ("task name with a space", recipe(experts=[{"name": "my spam", "path": "spam"}, {"name": "topic", "path": "topic"}],
                                      calibration={"my spam": "spam.txt", "topic": "topic.jsonl"}),
     "experts[0].name: task name 'my spam' may only use ASCII letters, digits, '_', '.' and '-'"),
    ("pickle expert", recipe(experts=[{"name": "spam", "path": "pickled"}, {"name": "topic", "path": "topic"}]),
     "experts[0].path: "),
    ("not a checkpoint", recipe(base="."), "base: "),
    ("repeated expert", recipe(experts=[{"name": "spam", "path": "spam"}, {"name": "spam", "path": "topic"}]),
     "experts[1].name: 'spam' is given twice"),
    ("unknown method", recipe(merge={"method": "slerp"}), "merge.method: Input should be"),
    ("bad parameter", recipe(merge={"method": "ties", "parameters": {"density": 2}}),
     "merge.parameters: invalid parameters for method 'ties': density:"),
    ("calibration of no expert", recipe(calibration={"spam": "spam.txt", "topic": "topic.jsonl", "zeta": "spam.txt"}),
     "calibration.zeta: no expert is named 'zeta'"),
    ("missing calibration file", recipe(calibration={"spam": "spam.txt", "topic": "gone.txt"}),
     "calibration.topic: "),
    ("unknown key", recipe(colour="red"), "colour: Extra inputs are not permitted"),
    ("bad beta", recipe(correction={"beta": -1}),
     "correction.beta: beta must be a finite positive number or 'auto', got -1"),
    ("two backbones", recipe(backbone="base"), "(top): give exactly one of merge, mergekit and backbone"),
    ("weight of a data-aware merge",
     recipe(experts=[{"name": "spam", "path": "spam"}, {"name": "topic", "path": "topic", "weight": 2}],
            merge={"method": "regmean"}),
     "experts[1].weight: per-expert weights apply to the data-free methods, not to 'regmean'"),
    ("bad prior", recipe(correction={"prior": 2}), "correction.prior: prior identity weight must be in [0, 1]"),
    ("not YAML", "experts: [unclosed\n", "line 2, column 1: not valid YAML: expected ',' or ']'"),
]


@pytest.mark.parametrize("name,content,message", BAD, ids=[b[0] for b in BAD])
def test_recipe_errors_name_the_yaml_path(user: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
                                          content: dict[str, object] | str, message: str) -> None:
    config = write(user, f"bad-{name.replace(' ', '_')}.yaml", content)
    out = tmp_path / "bundle"
    assert cli(["build", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"build failed: {config}: {message}" in err, err
    assert not out.exists()
    if name == "pickle expert":
        assert "holds pickle weights (pytorch_model.bin)" in err and "model.safetensors" in err
    if name == "not a checkpoint":
        assert "is not a transformers checkpoint (no config.json)" in err


def test_recipe_refuses_suite_options(user: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(user, "recipe.yaml", recipe())
    assert cli(["build", "--config", str(config), "--beta", "2", "--out", str(tmp_path / "b")]) == 2
    assert "--beta cannot be combined with --config" in capsys.readouterr().err


MERGEKIT = {
    "merge_method": "ties",
    "base_model": "base",
    "models": [{"model": "spam", "parameters": {"weight": 1.0, "density": 0.5}},
               {"model": "topic", "parameters": {"weight": 1.0, "density": 0.5}}],
    "parameters": {"normalize": True, "int8_mask": True},
    "dtype": "float32",
}


def test_mergekit_file_is_mapped_and_carried_into_the_bundle(user: Path, tmp_path: Path) -> None:
    write(user, "mergekit.yml", MERGEKIT)
    config = write(user, "recipe-mk.yaml", {k: v for k, v in recipe(mergekit="mergekit.yml").items()
                                            if k not in ("merge", "base")})
    out = tmp_path / "bundle"
    assert cli(["build", "--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    m = load_bundle(out).manifest
    assert m.merge.method == "ties" and m.merge.parameters == {"density": 0.5, "lam": 1.0, "freeze": []}
    assert (out / "backbone" / "mergekit_config.yml").read_text() == (user / "mergekit.yml").read_text()
    assert "backbone/mergekit_config.yml" in m.files and "mergekit" in (out / "README.md").read_text()
    # what mergekit computes here (equal weights, normalize true) is reprmerge's TIES: the same weights as by hand
    merged = tmp_path / "merged"
    merge_checkpoints(user / "base", {"spam": user / "spam", "topic": user / "topic"}, "ties", {"density": 0.5},
                      None, merged)
    ours, theirs = load_file(str(out / "backbone" / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    # a mergekit setting that does not map is refused, naming the file and its YAML path
    write(user, "mergekit-dare.yml", {**MERGEKIT, "merge_method": "dare_ties", "parameters": {}})
    bad = write(user, "recipe-dare.yaml", {k: v for k, v in recipe(mergekit="mergekit-dare.yml").items()
                                           if k not in ("merge", "base")})
    with pytest.raises(RecipeError, match=r"mergekit \(.*mergekit-dare.yml\) parameters.normalize: false"):
        build_from_recipe(bad, tmp_path / "dare")
    assert not (tmp_path / "dare").exists()


def test_an_already_merged_backbone_keeps_its_mergekit_files(user: Path, tmp_path: Path) -> None:
    """`backbone:` skips the merge: a mergekit output's config and card travel into the bundle's backbone."""
    merged = tmp_path / "mergekit_out"
    merge_checkpoints(user / "base", {"spam": user / "spam", "topic": user / "topic"}, "ties", {"density": 0.5},
                      None, merged)
    (merged / "mergekit_config.yml").write_text(yaml.safe_dump(MERGEKIT))
    (merged / "README.md").write_text("# a mergekit merge\n")
    config = write(tmp_path, "recipe.yaml", {**{k: v for k, v in recipe(backbone=str(merged)).items() if k != "merge"},
                                             "base": str(user / "base"),
                                             "experts": [{"name": "spam", "path": str(user / "spam")},
                                                         {"name": "topic", "path": str(user / "topic")}],
                                             "calibration": {"spam": str(user / "spam.txt"),
                                                             "topic": str(user / "topic.jsonl")}})
    out = tmp_path / "bundle"
    assert cli(["build", "--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    m = load_bundle(out).manifest
    assert (out / "backbone" / "README.md").read_text() == "# a mergekit merge\n"
    assert {"backbone/mergekit_config.yml", "backbone/README.md"} <= set(m.files)
    assert m.backbone.source == str(merged)
    assert m.merge.method == "mergekit:ties" and m.merge.parameters["parameters"] == MERGEKIT["parameters"]
    assert m.merge.parameters["models"][1] == {"model": "topic", "weight": 1.0, "density": 0.5}


MAPPINGS = [
    # (mergekit merge_method, global parameters, per-model parameters, base listed, reprmerge method, parameters)
    ("task_arithmetic", {"lambda": 0.8}, {"weight": 0.5}, False, "task_arithmetic", {"lam": 0.4}),
    ("task_arithmetic", {"normalize": True}, {"weight": 0.5}, False, "task_arithmetic", {"lam": 0.5}),
    ("ties", {}, {"weight": 0.3, "density": 0.2}, False, "ties", {"lam": 1.0, "density": 0.2}),
    ("dare_linear", {}, {"weight": 0.5, "density": 0.7}, False, "dare",
     {"lam": 0.5, "drop_rate": pytest.approx(0.3), "combine": "linear"}),
    ("dare_ties", {"normalize": True, "lambda": 0.9}, {"weight": 1, "density": 0.4}, False, "dare",
     {"lam": 0.9, "drop_rate": 0.6, "combine": "ties"}),
    ("linear", {}, {"weight": 1}, True, "task_arithmetic", {"lam": pytest.approx(1 / 3)}),
    ("linear", {}, {}, False, "task_arithmetic", {"lam": 0.5}),
]


@pytest.mark.parametrize("method,globals_,per_model,base_listed,expected_method,expected", MAPPINGS)
def test_mergekit_methods_map_by_their_semantics(method: str, globals_: dict, per_model: dict, base_listed: bool,
                                                 expected_method: str, expected: dict) -> None:
    models = [{"model": m, "parameters": per_model} for m in ("a", "b")]
    if base_listed:
        models.insert(0, {"model": "base", "parameters": per_model})
    mapped = map_mergekit({"merge_method": method, "base_model": "base", "models": models, "parameters": globals_})
    assert (mapped.method, mapped.params, mapped.models) == (expected_method, expected, ["a", "b"])


@pytest.mark.parametrize(("method", "globals_", "base_listed"), [
    ("task_arithmetic", {"lambda": 0.8}, False),
    ("task_arithmetic", {"lambda": 0.8, "normalize": True}, False),
    ("linear", {}, False),
    ("linear", {}, True),
])
def test_mergekit_unequal_weights_become_per_expert_weights(method: str, globals_: dict, base_listed: bool) -> None:
    # mergekit's weighted sum, written out: theta_0 + lambda * sum_k w_k tau_k, divided by the summed weights
    # (the base's too, with weight 1, when listed) when normalize
    w = {"a": 0.5, "b": 1.5}
    models = [{"model": m, "parameters": {"weight": v}} for m, v in w.items()]
    if base_listed:
        models.insert(0, {"model": "base", "parameters": {"weight": 1.0}})
    mapped = map_mergekit({"merge_method": method, "base_model": "base", "models": models, "parameters": globals_})
    assert mapped.weights == w
    g = torch.Generator().manual_seed(0)
    base = {"x": torch.randn(4, 3, generator=g, dtype=torch.float64)}
    experts = {m: {"x": base["x"] + torch.randn(4, 3, generator=g, dtype=torch.float64)} for m in w}
    ours = merge_state_dicts(base, experts, mapped.method, mapped.params, weights=mapped.weights).state_dict["x"]
    normalize = globals_.get("normalize", method == "linear")
    total = sum(w.values()) + (1.0 if base_listed else 0.0)
    summed = sum(v * (experts[m]["x"] - base["x"]) for m, v in w.items())
    expected = base["x"] + globals_.get("lambda", 1.0) * summed / (total if normalize else 1.0)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


REFUSED = [
    ({"merge_method": "slerp"}, "merge_method: 'slerp' does not map"),
    ({"models": [{"model": "a", "parameters": {"weight": 1, "density": 0.2}},
                 {"model": "b", "parameters": {"weight": 1, "density": 0.5}}]},
     "models[1].parameters.density: 0.5 differs from models[0].parameters.density"),
    ({"models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 2}}]},
     "models[1].parameters.weight: 2 differs"),
    ({"models": [{"model": "a", "parameters": {"weight": [0.1, 0.5]}}]}, "models[0].parameters.weight: must be one"),
    ({"models": [{"model": "a", "parameters": {"weight": 1, "epsilon": 0.1}}]},
     "models[0].parameters.epsilon: parameter 'epsilon' has no reprmerge equivalent"),
    ({"parameters": {"normalize": False}}, "parameters.normalize: false"),
    ({"dtype": "bfloat16"}, "dtype: 'bfloat16'"),
    ({"slices": []}, "slices: key 'slices' has no reprmerge equivalent"),
    ({"models": [{"model": "base", "parameters": {"weight": 1}}]}, "models: lists only the base model"),
]


@pytest.mark.parametrize("change,message", REFUSED, ids=[r[1].split(":")[0] for r in REFUSED])
def test_mergekit_settings_that_do_not_map_are_refused(change: dict, message: str) -> None:
    config = {"merge_method": "ties", "base_model": "base",
              "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 1}}],
              **change}
    with pytest.raises(MergekitError) as info:
        map_mergekit(config)
    assert str(info.value).startswith(message)


def test_recipe_refuses_an_expert_far_from_the_base_unless_forced(user: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    stray = tmp_path / "stray"
    model = BertModel.from_pretrained(user / "spam")
    with torch.no_grad():  # unrelated weights: 100x the fine-tuning-sized changes of the others
        for name, p in model.named_parameters():
            if name.startswith("encoder."):
                p.add_(2.0 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    model.save_pretrained(stray)
    for name in ("head.safetensors", "expert.json", *TOKENIZER_FILES):
        if (user / "spam" / name).exists():
            shutil.copy(user / "spam" / name, stray / name)
    experts = [{"name": "spam", "path": "spam"}, {"name": "topic", "path": "topic"},
               {"name": "stray", "path": str(stray)}]
    calibration = {"spam": "spam.txt", "topic": "topic.jsonl", "stray": "spam.txt"}
    config = write(user, "far.yaml", recipe(experts=experts, calibration=calibration))
    assert cli(["build", "--config", str(config), "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert "expert 'stray' is" in err and "as far from the base" in err and "force: true" in err, err
    assert not (tmp_path / "bundle").exists()
    config = write(user, "forced.yaml", recipe(experts=experts, calibration=calibration, force=True))
    assert cli(["build", "--config", str(config), "--out", str(tmp_path / "bundle")]) == 0
    check = load_bundle(tmp_path / "bundle").manifest.expert_diagnostics
    assert check is not None and check.norm_ratios["stray"] > 50
