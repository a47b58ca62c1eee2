"""Writing bundles atomically and loading them with full validation (schema, hashes, shapes, values).

Layout of a bundle directory:
    manifest.json            schema in `manifest.py`, sha256 of every other file
    statistics.safetensors   A.<task>, B.<task> (d, d) float64; n (T,) int64; e (T,) float64
    heads.safetensors        weight.<task> (classes, d), bias.<task> (classes,)
    backbone/                a transformers checkpoint (config, safetensors weights, tokenizer; a mergekit
                             source's mergekit_config.yml and README.md)
    README.md                the model card, rendered from the manifest and not listed in it (see `card`)
Tensors are safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from reprmerge_core import __version__
from reprmerge_core.artifacts import atomic_dir, atomic_file, check_output, checkpoint_files, sha256_file
from reprmerge_core.bundle.card import MERGEKIT_CONFIG, write_card
from reprmerge_core.bundle.check import BundleError, check_bundle, validate_content
from reprmerge_core.bundle.manifest import (
    BACKBONE_DIR,
    FORMAT,
    FORMAT_VERSION,
    HEADS_FILE,
    MANIFEST_FILE,
    STATISTICS_FILE,
    BackboneInfo,
    CorrectionInfo,
    Manifest,
    MergeInfo,
    TaskInfo,
)
from reprmerge_core.correction.heads import TaskHead
from reprmerge_core.correction.solver import CorrectionSolver
from reprmerge_core.correction.statistics import TaskStatistics
from reprmerge_core.diagnostics import ExpertDiagnostics

# Carried through as they are: a mergekit output's recipe and card, or the source model's own card.
_BACKBONE_DOCS = {MERGEKIT_CONFIG, "README.md"}


@dataclass(frozen=True)
class Bundle:
    """A loaded, validated bundle; tensors are on CPU."""

    path: Path
    manifest: Manifest
    statistics: list[TaskStatistics]
    heads: list[TaskHead]

    @property
    def backbone_path(self) -> Path:
        return self.path / BACKBONE_DIR

    @property
    def task_names(self) -> list[str]:
        return self.manifest.task_names

    def solver(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> CorrectionSolver:
        """The correction solver as the bundle records it (beta, normalisation, prior), fitted on its statistics:
        the service and `reprmerge export` fold preferences with it, so both answer the same."""
        c = self.manifest.correction
        return CorrectionSolver(c.beta, c.normalisation, identity_weight=c.identity_weight, device=device,
                                dtype=dtype).fit(self.statistics)


def _copy_backbone(src: Path, dst: Path) -> None:
    if not (src / "config.json").is_file():
        raise BundleError(BACKBONE_DIR, None, f"{src} is not a transformers checkpoint (no config.json)")
    dst.mkdir(parents=True)
    docs = [src / name for name in sorted(_BACKBONE_DOCS) if (src / name).is_file()]
    for item in [*checkpoint_files(src), *docs]:  # anything pickled (.bin, .pt, .pkl) is left behind
        shutil.copy2(item, dst / item.name)
    if not any(p.suffix == ".safetensors" for p in dst.iterdir()):
        raise BundleError(BACKBONE_DIR, None, f"{src} has no safetensors weights (pickled weights are refused)")


def _write_manifest(directory: Path, manifest: Manifest) -> None:
    """manifest.json (synced, then renamed over any old one) and the card rendered from it."""
    with atomic_file(directory / MANIFEST_FILE) as tmp, tmp.open("w") as f:
        f.write(manifest.model_dump_json(indent=2))
        f.flush()
        os.fsync(f.fileno())
    write_card(directory, manifest)


def write_bundle(
    out: str | Path,
    *,
    tasks: Sequence[TaskInfo],
    statistics: Sequence[TaskStatistics],
    heads: Sequence[TaskHead],
    backbone_dir: str | Path,
    correction: CorrectionInfo,
    merge: MergeInfo,
    backbone: BackboneInfo,
    extra: Mapping[str, Any] | None = None,
    expert_diagnostics: ExpertDiagnostics | None = None,
    overwrite: bool = False,
) -> Path:
    """Validate everything, write it into a temporary sibling directory, then rename into place.

    A crash or a validation error leaves no partial bundle at `out`; with `overwrite` an existing
    bundle is replaced only once the new one is complete.
    """
    out = check_output(out, {}, overwrite=overwrite)
    if not (len(tasks) == len(statistics) == len(heads)):
        raise ValueError(f"got {len(tasks)} tasks, {len(statistics)} statistics and {len(heads)} heads")
    dim = statistics[0].dim
    stats_tensors: dict[str, torch.Tensor] = {
        "n": torch.tensor([s.n for s in statistics], dtype=torch.int64),
        "e": torch.tensor([s.e for s in statistics], dtype=torch.float64),
    }
    head_tensors: dict[str, torch.Tensor] = {}
    for task, s, h in zip(tasks, statistics, heads, strict=True):
        stats_tensors[f"A.{task.name}"] = s.A.detach().cpu().to(torch.float64).contiguous()
        stats_tensors[f"B.{task.name}"] = s.B.detach().cpu().to(torch.float64).contiguous()
        head_tensors[f"weight.{task.name}"] = h.weight.detach().cpu().float().contiguous()
        head_tensors[f"bias.{task.name}"] = h.bias.detach().cpu().float().contiguous()
    validate_content(tasks, dim, {k: v.numpy() for k, v in stats_tensors.items()},
                     {k: v.numpy() for k, v in head_tensors.items()})

    with atomic_dir(out) as tmp:
        save_file(stats_tensors, str(tmp / STATISTICS_FILE))
        save_file(head_tensors, str(tmp / HEADS_FILE))
        _copy_backbone(Path(backbone_dir), tmp / BACKBONE_DIR)
        files = {
            p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        bundle_id = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
        manifest = Manifest(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            bundle_id=bundle_id,
            library_version=__version__,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            representation_dim=dim,
            tasks=list(tasks),
            correction=correction,
            merge=merge,
            backbone=backbone,
            files=files,
            extra=dict(extra or {}),
            expert_diagnostics=expert_diagnostics,
        )
        _write_manifest(tmp, manifest)
    return out


def amend_manifest(path: str | Path, *, merge: MergeInfo | None = None, backbone_source: str | None = None,
                   extra: Mapping[str, Any] | None = None) -> Manifest:
    """Record in a written bundle what its writer could not know (how the backbone was merged, the recipe), e.g.
    `build --config` around `calibrate_bundle`. Only the manifest changes (atomically, re-validated), so the
    files, their hashes and the bundle id stay; the card is rendered again."""
    path = Path(path)
    old = check_bundle(path).manifest
    data = old.model_dump(mode="json")
    if merge is not None:
        data["merge"] = merge.model_dump(mode="json")
    if backbone_source is not None:
        data["backbone"]["source"] = backbone_source
    data["extra"] = {**old.extra, **(extra or {})}
    manifest = Manifest.model_validate(data)
    _write_manifest(path, manifest)
    return manifest


def load_bundle(path: str | Path, *, verify_hashes: bool = True) -> Bundle:
    """Load and validate a bundle (`check_bundle`); any problem raises `BundleError` naming the file and field."""
    checked = check_bundle(path, verify_hashes=verify_hashes)
    stats = {k: torch.from_numpy(v) for k, v in checked.statistics.items()}
    heads = {k: torch.from_numpy(v) for k, v in checked.heads.items()}
    names = checked.manifest.task_names
    return Bundle(
        path=checked.path,
        manifest=checked.manifest,
        statistics=[
            TaskStatistics(stats[f"A.{t}"], stats[f"B.{t}"], int(stats["n"][i]), float(stats["e"][i]))
            for i, t in enumerate(names)
        ],
        heads=[TaskHead(heads[f"weight.{t}"], heads[f"bias.{t}"]) for t in names],
    )
