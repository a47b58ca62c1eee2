"""Bundle round trip, integrity checks and the inspect command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from reprmerge_core.backbone import Backbone
from reprmerge_core.bundle import BundleError, load_bundle
from reprmerge_core.bundle.check import sha256_file
from reprmerge_cli import main as cli
from reprmerge_core.bundle import write_bundle
from reprmerge_core.bundle.manifest import BackboneInfo, CorrectionInfo, MergeInfo, TaskInfo
from reprmerge_core.correction import TaskHead
from reprmerge_core.diagnostics import ExpertDiagnostics, HeadPair
from tests.helpers import make_random_bundle, random_statistics


def rewrite(bundle: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Replace a tensor file and fix its hash, as a buggy (not malicious) writer would."""
    save_file(tensors, str(bundle / name))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(bundle / name)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    g = torch.Generator().manual_seed(0)
    path = make_random_bundle(tmp_path / "b", tiny_backbone_dir, generator=g)
    bundle = load_bundle(path)
    m = bundle.manifest
    assert m.task_names == ["alpha", "beta", "gamma"]
    assert [t.labels for t in m.tasks] == [["no", "yes"], ["a", "b", "c"], ["x", "y"]]
    assert m.representation_dim == 32 and m.format_version == 2
    assert m.correction.beta == 0.3 and m.correction.normalisation.value == "energy"
    assert set(m.files) >= {"statistics.safetensors", "heads.safetensors", "backbone/config.json", "backbone/model.safetensors"}
    # The same generator sequence rebuilds the same tensors: compare with what was written.
    again = load_bundle(make_random_bundle(tmp_path / "c", tiny_backbone_dir, generator=torch.Generator().manual_seed(0)))
    for s1, s2 in zip(bundle.statistics, again.statistics):
        assert torch.equal(s1.A, s2.A) and torch.equal(s1.B, s2.B) and s1.n == s2.n == 64 and s1.e == s2.e
        assert s1.A.dtype == torch.float64
    for h1, h2 in zip(bundle.heads, again.heads):
        assert torch.equal(h1.weight, h2.weight) and torch.equal(h1.bias, h2.bias)
    assert again.manifest.bundle_id == m.bundle_id  # content-addressed
    backbone = Backbone.from_pretrained(bundle.backbone_path, device="cpu")
    assert backbone.encode(["a sentence", "another"]).shape == (2, 32)


def test_flipped_byte_is_detected(random_bundle: Path) -> None:
    target = random_bundle / "heads.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="heads.safetensors: sha256 mismatch") as info:
        load_bundle(random_bundle)
    assert info.value.file == "heads.safetensors"


def test_missing_file_is_named(random_bundle: Path) -> None:
    (random_bundle / "backbone" / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="backbone/model.safetensors: file listed in the manifest is missing"):
        load_bundle(random_bundle)
    (random_bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json: missing"):
        load_bundle(random_bundle)


def test_nan_in_a_statistic_is_named(random_bundle: Path) -> None:
    stats = load_file(str(random_bundle / "statistics.safetensors"))
    stats["B.beta"][3, 4] = float("nan")
    rewrite(random_bundle, "statistics.safetensors", stats)
    with pytest.raises(BundleError, match=r"statistics.safetensors: B.beta: contains NaN") as info:
        load_bundle(random_bundle)
    assert (info.value.file, info.value.field) == ("statistics.safetensors", "B.beta")


def test_wrong_shape_is_named(random_bundle: Path) -> None:
    heads = load_file(str(random_bundle / "heads.safetensors"))
    heads["weight.gamma"] = torch.zeros(2, 31)
    rewrite(random_bundle, "heads.safetensors", heads)
    with pytest.raises(BundleError, match=r"heads.safetensors: weight.gamma: expected shape \(2, 32\), got \(2, 31\)"):
        load_bundle(random_bundle)


def test_unknown_format_version(random_bundle: Path) -> None:
    manifest = json.loads((random_bundle / "manifest.json").read_text())
    manifest["format_version"] = 99
    (random_bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version: unsupported format version 99"):
        load_bundle(random_bundle)


def test_schema_errors_name_the_field(random_bundle: Path) -> None:
    manifest = json.loads((random_bundle / "manifest.json").read_text())
    manifest["correction"]["beta"] = -1
    (random_bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="manifest.json: correction.beta") as info:
        load_bundle(random_bundle)
    assert info.value.field == "correction.beta"
    (random_bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(random_bundle)


def test_failed_write_leaves_nothing_and_existing_bundle_is_kept(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    g = torch.Generator().manual_seed(1)
    with pytest.raises(BundleError, match="no config.json"):
        make_random_bundle(tmp_path / "b", tmp_path, generator=g)
    assert list(tmp_path.iterdir()) == []
    path = make_random_bundle(tmp_path / "b", tiny_backbone_dir, generator=g)
    before = (path / "manifest.json").read_text()
    with pytest.raises(FileExistsError):
        make_random_bundle(path, tiny_backbone_dir, generator=g)
    assert (path / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_inspect_command(random_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["inspect", str(random_bundle)]) == 0
    out = capsys.readouterr().out
    assert "VALID" in out and "alpha" in out and "beta=0.3" in out
    (random_bundle / "statistics.safetensors").write_bytes(b"broken")
    assert cli(["inspect", str(random_bundle)]) == 1
    assert "statistics.safetensors: sha256 mismatch" in capsys.readouterr().err


def test_manifests_without_expert_diagnostics_still_load(
    random_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bundles written before the expert checks have no `expert_diagnostics`: the field is optional."""
    manifest = json.loads((random_bundle / "manifest.json").read_text())
    assert manifest.pop("expert_diagnostics") is None
    (random_bundle / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(random_bundle).manifest.expert_diagnostics is None
    pair = {"tasks": ["alpha", "beta"], "max_row_cosine": 0.99, "aligned": True}
    manifest["expert_diagnostics"] = {"head_pairs": [pair], "warnings": ["alpha~beta"]}
    (random_bundle / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_bundle(random_bundle).manifest.expert_diagnostics
    assert loaded is not None and loaded.head_pairs[0].aligned
    assert cli(["inspect", str(random_bundle)]) == 0
    out = capsys.readouterr().out
    assert "max head row cosine across tasks 0.990; 1 warning(s)" in out and "WARNING alpha~beta" in out


def _card_bundle(tmp_path: Path, tiny_backbone_dir: Path) -> Path:
    """A bundle over a mergekit-made backbone (its config and card beside the weights), with expert diagnostics."""
    source = shutil.copytree(tiny_backbone_dir, tmp_path / "mergekit_out")
    (source / "mergekit_config.yml").write_text("merge_method: ties\nparameters:\n  density: 0.3\n")
    (source / "README.md").write_text("---\ntags: [mergekit]\n---\n# merged by mergekit\n")
    g = torch.Generator().manual_seed(3)
    tasks = {"spam": ["ham", "spam"], "topic": ["sport", "food", "tech"]}
    diagnostics = ExpertDiagnostics(
        head_pairs=[HeadPair(tasks=("spam", "topic"), max_row_cosine=0.9312, aligned=True)],
        task_vector_norms={"spam": 12.5, "topic": 14.25}, norm_ratios={"spam": 0.877, "topic": 1.14},
        warnings=["heads of 'spam' and 'topic' are aligned (max row cosine 0.931)"])
    return write_bundle(
        tmp_path / "bundle", tasks=[TaskInfo(name=t, labels=l, calibration_samples=40 + i)
                                    for i, (t, l) in enumerate(tasks.items())],
        statistics=[random_statistics(32, 40 + i, g) for i in range(2)],
        heads=[TaskHead(torch.randn(len(labels), 32, generator=g), torch.randn(len(labels), generator=g))
               for labels in tasks.values()],
        backbone_dir=source, correction=CorrectionInfo(beta=0.25, normalisation="energy", identity_weight=0.5),
        merge=MergeInfo(method="ties", parameters={"density": 0.3, "lam": 1.0}),
        backbone=BackboneInfo(source="mergekit ties of 2 experts", pooling="mean", max_length=32),
        extra={"base_model": "sentence-transformers/all-MiniLM-L6-v2",
               "head_agreement": {"mean": 0.75, "per_task": {"spam": 0.9, "topic": 0.6}}},
        expert_diagnostics=diagnostics,
    )


def test_model_card_states_what_the_manifest_records(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    path = _card_bundle(tmp_path, tiny_backbone_dir)
    m = load_bundle(path).manifest
    card = (path / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["pipeline_tag"] == "text-classification" and meta["library_name"] == "reprmerge"
    assert meta["base_model"] == m.extra["base_model"]
    assert {"reprmerge", "merge-ties", "mergekit"} <= set(meta["tags"])
    assert f"# reprmerge bundle {m.bundle_id}" in body
    for t in m.tasks:  # one table row per task: its labels and calibration size
        assert f"| {t.name} | {', '.join(t.labels)} | {t.calibration_samples} |" in body
    assert f"- method: `{m.merge.method}`" in body
    assert f"- parameters: `{json.dumps(m.merge.parameters, sort_keys=True)}`" in body
    assert f"- beta: {m.correction.beta:g} (given)" in body and f"- prior: {m.correction.prior} " in body
    pair = m.expert_diagnostics.head_pairs[0]
    assert f"| spam / topic | {pair.max_row_cosine:.3f} | - | yes |" in body
    assert "| topic | 14.25 | 1.14 |" in body and f"- WARNING {m.expert_diagnostics.warnings[0]}" in body
    assert "| spam | 0.900 |" in body and "Not evaluated yet" in body
    # the mergekit source's recipe and card travel with the backbone, hashed like its weights
    for name in ("mergekit_config.yml", "README.md"):
        assert f"backbone/{name}" in m.files and (path / "backbone" / name).is_file()
    assert "- mergekit configuration: `backbone/mergekit_config.yml`" in body


def test_model_card_is_outside_the_hashes(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    """Deliberately unlisted: `evaluate --update-card` rewrites it without changing the bundle's identity."""
    path = make_random_bundle(tmp_path / "b", tiny_backbone_dir, generator=torch.Generator().manual_seed(0))
    m = load_bundle(path).manifest
    assert "README.md" not in m.files and (path / "README.md").is_file()
    (path / "README.md").write_text("edited by hand")
    assert load_bundle(path).manifest.bundle_id == m.bundle_id


def test_evaluate_writes_its_figures_into_the_card(random_bundle: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    labels = {"alpha": ["no", "yes"], "beta": ["a", "b", "c"], "gamma": ["x", "y"]}
    args = ["evaluate", str(random_bundle), "--out", str(tmp_path / "report"), "--no-baseline", "--device", "cpu",
            "--update-card"]
    for task, names in labels.items():
        rows = [f'{{"text": "example {i} of {task}", "label": "{names[i % len(names)]}"}}' for i in range(12)]
        (tmp_path / f"{task}.jsonl").write_text("\n".join(rows) + "\n")
        args += ["--test", f"{task}={tmp_path / f'{task}.jsonl'}"]
    assert cli(args) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    body = (random_bundle / "README.md").read_text()
    equal = report["scenarios"]["equal"]
    assert ("| equal | " + " | ".join(f"{a:.4f}" for a in equal["accuracy"]) + f" | {equal['mean_normalised']:.4f} |"
            in body)
    assert f"{report['grid']['react']['hypervolume']:.4f}" in body and "Not evaluated yet" not in body
    load_bundle(random_bundle)  # still valid
