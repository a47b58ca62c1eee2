"""`reprmerge merge` end to end on tiny random BERT checkpoints with the real MiniLM tokenizer."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils as peft
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

from reprmerge_cli import main
from reprmerge_core.merging import REPORT_FILE, merge_sequential, text_batches
from reprmerge_core.merging.diagnostics import task_vector_norm
from tests.helpers import TOKENIZER_FILES

TEXTS = [
    "free entry to win a prize now",
    "are we still meeting at noon?",
    "what is the capital of peru",
    "a dull , lifeless film",
    "who wrote hamlet",
    "call me when you land",
    "an utterly charming story",
]


def copy_tokenizer(src: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)


def make_expert(base_dir: Path, out: Path, seed: int, with_head: bool = False, scale: float = 0.05) -> Path:
    """The base with every encoder parameter moved (embeddings frozen, as in the project's experts)."""
    base = BertModel.from_pretrained(base_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if not name.startswith("embeddings."):
                p.add_(scale * torch.randn(p.shape, generator=gen))
    if with_head:
        model = BertForSequenceClassification(BertConfig.from_pretrained(base_dir, num_labels=3))
        model.bert.load_state_dict(base.state_dict())
        model.save_pretrained(out)
    else:
        base.save_pretrained(out)
    copy_tokenizer(base_dir, out)
    return out


@pytest.fixture(scope="module")
def experts(tiny_backbone_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experts")
    return {
        "spam": make_expert(tiny_backbone_dir, root / "spam", 1, with_head=True),
        "trec": make_expert(tiny_backbone_dir, root / "trec", 2),
    }


def merge_args(base: Path, experts: dict[str, Path], out: Path, method: str, *extra: str) -> list[str]:
    args = ["merge", "--base", str(base), "--method", method, "--out", str(out)]
    for name, path in experts.items():
        args += ["--expert", f"{name}={path}"]
    return args + list(extra)


def state(path: Path) -> dict[str, torch.Tensor]:
    return AutoModel.from_pretrained(path).state_dict()


def test_projection_merge_writes_a_loadable_checkpoint_and_report(
    tiny_backbone_dir: Path, experts: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "spam.txt").write_text("\n".join(TEXTS[:4]) + "\n")
    (tmp_path / "trec.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[3:]))
    out = tmp_path / "merged"
    rc = main(
        merge_args(
            tiny_backbone_dir,
            experts,
            out,
            "projection",
            "--set",
            "basis=eigen",
            "--calibration",
            f"spam={tmp_path / 'spam.txt'}",
            "--calibration",
            f"trec={tmp_path / 'trec.jsonl'}",
        )
    )
    assert rc == 0
    merged, base = state(out), state(tiny_backbone_dir)
    assert (
        AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(tiny_backbone_dir).get_vocab()
    )
    assert torch.equal(merged["embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"])
    name = "encoder.layer.1.intermediate.dense.weight"
    assert not torch.equal(merged[name], base[name])
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["method"] == "projection" and report["params"]["basis"] == "eigen"
    assert len(report["layers"]) == 2 * 6 + 1  # six linear layers per block and the pooler
    assert all(0.0 <= layer["rho"] <= 1.0 + 1e-9 for layer in report["layers"].values())
    assert 0.0 <= report["rho"] <= 1.0
    assert {"load_and_check", "calibration", "merge_and_save"} <= set(report["timings"])  # streamed: one pass


def test_ties_merge_matches_peft(tiny_backbone_dir: Path, experts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ties"
    assert main(merge_args(tiny_backbone_dir, experts, out, "ties", "--set", "density=0.4", "--set", "lambda=0.9")) == 0
    merged, base = state(out), state(tiny_backbone_dir)
    expert_states = [state(path) for path in experts.values()]  # the head of "spam" is not part of it
    emb = "embeddings.word_embeddings.weight"  # the encoder under the head was really loaded, not re-initialised
    assert all(torch.equal(e[emb], base[emb]) for e in expert_states)
    name = "encoder.layer.0.attention.self.query.weight"
    deltas = [(e[name] - base[name]).double() for e in expert_states]
    reference = base[name].double() + peft.ties(deltas, torch.full((2,), 0.9, dtype=torch.float64), density=0.4)
    torch.testing.assert_close(merged[name], reference.float())
    assert "rho" in json.loads((out / REPORT_FILE).read_text())


def test_sequential_regmean_matches_the_library_on_a_fresh_model(
    tiny_backbone_dir: Path, experts: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "cal.txt").write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "seq"
    cal = [arg for task in experts for arg in ("--calibration", f"{task}={tmp_path / 'cal.txt'}")]
    assert main(merge_args(tiny_backbone_dir, experts, out, "regmean", "--set", "sequential=true", *cal)) == 0
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["params"]["sequential"] is True and len(report["layers"]) == 13
    # the same merge through the library, on a model that shares no tensors with the base state
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone_dir)
    batches = {task: text_batches(tokenizer, TEXTS, 32, 128) for task in experts}
    fresh = BertModel.from_pretrained(tiny_backbone_dir)
    reference = merge_sequential(
        fresh,
        state(tiny_backbone_dir),
        {t: state(p) for t, p in experts.items()},
        "regmean",
        {"sequential": True},
        batches,
    )
    merged = state(out)
    for name, value in reference.state_dict.items():
        torch.testing.assert_close(merged[name], value, msg=name)


def test_incompatible_expert_is_refused_naming_the_parameter(
    tiny_backbone_dir: Path, experts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = BertConfig.from_pretrained(tiny_backbone_dir, intermediate_size=48)
    BertModel(config).save_pretrained(tmp_path / "odd")
    copy_tokenizer(tiny_backbone_dir, tmp_path / "odd")
    out = tmp_path / "never"
    rc = main(merge_args(tiny_backbone_dir, {**experts, "odd": tmp_path / "odd"}, out, "task_arithmetic"))
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert (
        "parameter encoder.layer.0.intermediate.dense.weight: base shape (64, 32) vs expert 'odd' shape (48, 32)" in err
    )
    assert "config intermediate_size: base 64 vs expert 'odd' 48" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "density=2"], "density"),
        (["--set", "basis=eigen"], "basis"),  # not a ties parameter
    ],
)
def test_bad_parameters_are_refused_before_loading(
    tiny_backbone_dir: Path,
    experts: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    assert main(merge_args(tiny_backbone_dir, experts, tmp_path / "x", "ties", *extra)) == 2
    assert message in capsys.readouterr().err


def test_data_aware_method_needs_calibration(
    tiny_backbone_dir: Path, experts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(merge_args(tiny_backbone_dir, experts, tmp_path / "x", "regmean")) == 2
    assert "calibration" in capsys.readouterr().err


def with_head(expert: Path, head_seed: int) -> Path:
    """Give `expert` a head.safetensors started from `head_seed` and moved ~3%, as one epoch of training does."""
    torch.manual_seed(head_seed)
    head = torch.nn.Linear(BertConfig.from_pretrained(expert).hidden_size, 2)
    gen = torch.Generator().manual_seed(1000 + head_seed)
    weight = head.weight.detach() * (1 + 0.03 * torch.randn(head.weight.shape, generator=gen))
    tensors = {"weight": weight.contiguous(), "bias": head.bias.detach().contiguous()}
    save_file(tensors, str(expert / "head.safetensors"))
    return expert


def test_merge_refuses_an_expert_far_from_the_base_unless_forced_and_warns_on_heads_from_one_seed(
    tiny_backbone_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = {name: with_head(make_expert(tiny_backbone_dir, tmp_path / name, seed), head_seed=0)
              for name, seed in (("sms", 1), ("movie", 2))}
    shared["stray"] = with_head(make_expert(tiny_backbone_dir, tmp_path / "stray", 3, scale=5.0), head_seed=7)
    assert main(merge_args(tiny_backbone_dir, shared, tmp_path / "bad", "ties")) == 2  # it used to merge silently
    err = capsys.readouterr().err
    base = state(tiny_backbone_dir)
    stray_norm = task_vector_norm(base, state(shared["stray"]))
    sms_norm, movie_norm = (task_vector_norm(base, state(shared[n])) for n in ("sms", "movie"))
    ratio = stray_norm / ((sms_norm + movie_norm) / 2)  # the median of two peers is their mean
    assert f"expert 'stray' is {ratio:.1f}x as far from the base" in err and f"norm {stray_norm:.3g}" in err
    assert "--force" in err and not (tmp_path / "bad").exists()
    with caplog.at_level("WARNING"):
        assert main(merge_args(tiny_backbone_dir, shared, tmp_path / "bad", "ties", "--force")) == 0
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("sms~movie" in m and "initialisation" in m for m in messages), messages
    assert any("stray" in m and "far from the base" in m for m in messages), messages
    assert "WARNING: 2 expert check(s) failed" in capsys.readouterr().out
    check = json.loads((tmp_path / "bad" / REPORT_FILE).read_text())["expert_diagnostics"]
    assert check["task_vector_norms"]["stray"] == pytest.approx(stray_norm, rel=1e-9)
    assert check["norm_ratios"]["stray"] > 50  # 5.0 vs 0.05 per parameter
    pairs = {tuple(p["tasks"]): p for p in check["head_pairs"]}
    assert pairs["sms", "movie"]["aligned"] and pairs["sms", "movie"]["direction_cosine"] > 0.99
    assert not pairs["sms", "stray"]["aligned"]

    caplog.clear()
    fixed = {name: with_head(make_expert(tiny_backbone_dir, tmp_path / f"own-{name}", seed), head_seed=100 + seed)
             for name, seed in (("sms", 1), ("movie", 2), ("trec", 3))}
    with caplog.at_level("WARNING"):
        assert main(merge_args(tiny_backbone_dir, fixed, tmp_path / "good", "ties")) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    check = json.loads((tmp_path / "good" / REPORT_FILE).read_text())["expert_diagnostics"]
    assert check["warnings"] == [] and len(check["head_pairs"]) == 3 and max(check["norm_ratios"].values()) < 1.5


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_merge_never_damages_what_the_user_owns(
    tiny_backbone_dir: Path, experts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """`--out` used to overwrite silently: pointed at an expert it destroyed that expert's weights."""
    before = {name: _tree(path) for name, path in experts.items()}
    spam = experts["spam"]
    for out, flags, message in [
        (spam, ["--overwrite"], "overlaps the expert 'spam'"),  # an input, even when overwriting is allowed
        (spam / "merged", ["--overwrite"], "overlaps the expert 'spam'"),  # inside an input
        (spam.parent, ["--overwrite"], "overlaps"),  # holds the inputs: replacing it would delete them
        (tiny_backbone_dir, ["--overwrite"], "overlaps the base"),
    ]:
        assert main(merge_args(tiny_backbone_dir, experts, out, "ties", *flags)) == 2
        assert message in capsys.readouterr().err
    assert {name: _tree(path) for name, path in experts.items()} == before

    existing = tmp_path / "merged"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert main(merge_args(tiny_backbone_dir, experts, existing, "ties")) == 2
    assert "exists; add --overwrite" in capsys.readouterr().err and (existing / "keep.txt").read_text() == "mine"

    assert main(merge_args(tiny_backbone_dir, experts, existing, "ties", "--overwrite")) == 0  # replaced whole
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_merge_reads_calibration_by_format(
    tiny_backbone_dir: Path, experts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gzipped CSV's named column gives the merge the texts a plain text file does (its header and labels
    are no inputs); a latin-1 file is refused naming file and line before any model loads."""
    (tmp_path / "spam.txt").write_text("\n".join(TEXTS[:4]) + "\n")
    (tmp_path / "trec.txt").write_text("\n".join(TEXTS[3:]) + "\n")
    rows = "label,body\n" + "".join(f'ham,"{t}"\n' for t in TEXTS[3:])
    (tmp_path / "trec.csv.gz").write_bytes(gzip.compress(rows.encode()))
    plain, table = tmp_path / "plain", tmp_path / "table"
    common = ["--calibration", f"spam={tmp_path / 'spam.txt'}"]
    assert main(merge_args(tiny_backbone_dir, experts, plain, "regmean", *common,
                           "--calibration", f"trec={tmp_path / 'trec.txt'}")) == 0
    assert main(merge_args(tiny_backbone_dir, experts, table, "regmean", *common, "--text-column", "body",
                           "--calibration", f"trec={tmp_path / 'trec.csv.gz'}")) == 0
    a, b = state(plain), state(table)
    assert all(torch.equal(a[k], b[k]) for k in a)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok\nna\u00efve\n".encode("latin-1"))
    capsys.readouterr()
    assert main(merge_args(tiny_backbone_dir, experts, tmp_path / "never", "regmean", *common,
                           "--calibration", f"trec={latin}")) == 2
    assert f"merge failed: {latin}:2: not UTF-8 (byte 0xef at byte 3 of the line)" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
