"""The bundle's model card (`README.md`, Hugging Face style): what a reader of the folder or of a model hub sees.

Rendered from the manifest alone (plus an evaluation report when one is given), without torch. The card is
not listed in the manifest's `files`: it is documentation derived from `manifest.json`, which stays the one
source of truth (and whose hashes guard every file a bundle is loaded from), so `reprmerge evaluate
--update-card` can add evaluation figures without changing the bundle's identity or breaking its checks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reprmerge_core.bundle.manifest import BACKBONE_DIR, CARD_FILE, MANIFEST_FILE, Manifest

MERGEKIT_CONFIG = "mergekit_config.yml"


def _front_matter(manifest: Manifest) -> str:
    """YAML front matter; values are JSON scalars, which YAML reads as they are."""
    tags = ["reprmerge", "model-merging", "multi-task", "text-classification", f"merge-{manifest.merge.method}"]
    if f"{BACKBONE_DIR}/{MERGEKIT_CONFIG}" in manifest.files:
        tags.append("mergekit")
    lines = ["---", "library_name: reprmerge", "pipeline_tag: text-classification", "tags:"]
    lines += [f"- {json.dumps(tag)}" for tag in tags]
    base_model = manifest.extra.get("base_model")
    if isinstance(base_model, str) and base_model:
        lines.append(f"base_model: {json.dumps(base_model)}")
    lines.append("---")
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(x).replace("|", "\\|") for x in row) + " |" for row in rows]


def _diagnostics(manifest: Manifest) -> list[str]:
    lines = ["## Expert diagnostics", ""]
    agreement = manifest.extra.get("head_agreement")
    if isinstance(agreement, Mapping) and "per_task" in agreement:
        lines += [f"Head agreement (label-free): {agreement['mean']:.3f} of calibration inputs get the expert's class "
                  "from the merged backbone.", ""]
        lines += _table(["task", "agreement"], [(t, f"{v:.3f}") for t, v in agreement["per_task"].items()]) + [""]
    check = manifest.expert_diagnostics
    if check is None:
        return lines + ["No expert checks were recorded for this bundle.", ""]
    if check.head_pairs:
        lines += ["Head alignment across tasks (a high cosine means two heads read the same directions):", ""]
        lines += _table(["tasks", "max row cosine", "direction cosine", "aligned"],
                        [(" / ".join(p.tasks), f"{p.max_row_cosine:.3f}",
                          "-" if p.direction_cosine is None else f"{p.direction_cosine:.3f}",
                          "yes" if p.aligned else "no")
                         for p in check.head_pairs]) + [""]
    if check.task_vector_norms is not None:
        lines += ["Distance of each expert from the base (task-vector norm; ratio to the other experts' median):", ""]
        lines += _table(["task", "norm", "ratio"], [(t, f"{v:.4g}", f"{check.norm_ratios[t]:.3g}"
                                                     if t in check.norm_ratios else "-")
                                                    for t, v in check.task_vector_norms.items()]) + [""]
    lines += [f"Warnings: {len(check.warnings)}."] + [f"- WARNING {w}" for w in check.warnings] + [""]
    return lines


def _evaluation(manifest: Manifest, report: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if report is None:
        return lines + ["Not evaluated yet: `reprmerge evaluate BUNDLE --out DIR --update-card` adds the figures here.",
                        ""]
    names = list(report["tasks"])
    scenarios = report["scenarios"]
    lines += [f"Accuracy on {', '.join(f'{n} ({k} examples)' for n, k in zip(names, report['test_examples']))}; "
              f"normalised by {report['normalised_by']}.", ""]
    rows = [(label, *(f"{a:.4f}" for a in s["accuracy"]), f"{s['mean_normalised']:.4f}")
            for label, s in scenarios.items()]
    lines += _table(["preference", *names, "mean normalised"], rows) + [""]
    react = report.get("grid", {}).get("react")
    if react is not None:
        lines += [f"Hypervolume of the preference grid (normalised accuracy): {react['hypervolume']:.4f}.", ""]
    return lines


def render_card(manifest: Manifest, evaluation: Mapping[str, Any] | None = None) -> str:
    """The card's Markdown: tasks and labels, merge, correction, calibration sizes, diagnostics, evaluation."""
    m, c = manifest, manifest.correction
    if evaluation is not None and evaluation.get("bundle_id") != m.bundle_id:
        raise ValueError(f"evaluation report is of bundle {evaluation.get('bundle_id')}, not {m.bundle_id}")
    tasks = ", ".join(t.name for t in m.tasks)
    lines = [
        _front_matter(m), "",
        f"# reprmerge bundle {m.bundle_id}", "",
        f"One merged encoder serving {len(m.tasks)} classification tasks ({tasks}) with a closed-form, per-request "
        "preference correction: a request weighs the tasks, and the correction for that trade-off is folded into "
        "the task heads. Written by reprmerge " f"{m.library_version} on {m.created_at}.", "",
        "## Tasks", "",
        *_table(["task", "labels", "calibration inputs"],
                [(t.name, ", ".join(t.labels), t.calibration_samples) for t in m.tasks]), "",
        "## Merge", "",
        f"- method: `{m.merge.method}`",
        f"- parameters: `{json.dumps(m.merge.parameters, sort_keys=True)}`",
        f"- backbone: {m.backbone.source} (pooling {m.backbone.pooling}, max_length {m.backbone.max_length}, "
        f"d = {m.representation_dim}); `{BACKBONE_DIR}/` loads with `AutoModel.from_pretrained`",
    ]
    if f"{BACKBONE_DIR}/{MERGEKIT_CONFIG}" in m.files:
        lines.append(f"- mergekit configuration: `{BACKBONE_DIR}/{MERGEKIT_CONFIG}`")
    if "build_recipe" in m.extra:
        lines.append("- built from a recipe file: recorded in `manifest.json` (`extra.build_recipe`), shown by "
                     "`reprmerge inspect`")
    lines += [
        "", "## Correction", "",
        f"- beta: {c.beta:g}" + (" (chosen by k-fold cross-validation)" if c.beta_selection else " (given)"),
        f"- prior: {c.prior} (identity weight {c.identity_weight:g})"
        + (" (chosen by k-fold cross-validation)" if c.prior_selection and c.prior_selection.get("chosen") else ""),
        f"- normalisation: {c.normalisation.value}", "",
        *_diagnostics(m),
        *_evaluation(m, evaluation),
        "## Use", "",
        "```bash",
        "reprmerge serve BUNDLE    # HTTP: POST /v1/predict {\"texts\": [...], \"preference\": {...}}",
        "reprmerge export BUNDLE --preference '{\"" + m.tasks[0].name + "\": 1}' --format onnx --out DIR",
        "```", "",
        f"This card is generated from `{MANIFEST_FILE}` and is not listed in it: the manifest's sha256 list guards "
        "every file the bundle is loaded from.", "",
    ]
    return "\n".join(lines)


def write_card(bundle_dir: str | Path, manifest: Manifest, evaluation: Mapping[str, Any] | None = None) -> Path:
    """Write (or replace, atomically) the bundle's `README.md`."""
    path = Path(bundle_dir) / CARD_FILE
    tmp = path.with_name(f".{CARD_FILE}.tmp-{os.getpid()}")
    try:
        tmp.write_text(render_card(manifest, evaluation), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
