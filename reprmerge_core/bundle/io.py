"""Writing bundles atomically and loading them with full validation (schema, hashes, shapes, values).

Layout of a bundle directory:
    manifest.json            schema in `manifest.py`, sha256 of every other file
    statistics.safetensors   A.<task>, B.<task> (d, d) float64; n (T,) int64; e (T,) float64
    heads.safetensors        weight.<task> (classes, d), bias.<task> (classes,)
    backbone/                a transformers checkpoint (config, safetensors weights, tokenizer)
Tensors are safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from reprmerge_core import __version__
from reprmerge_core.correction.heads import TaskHead
from reprmerge_core.correction.statistics import TaskStatistics
from reprmerge_core.merging.diagnostics import ExpertDiagnostics
from reprmerge_core.bundle.manifest import (
    BACKBONE_DIR,
    FORMAT,
    FORMAT_VERSION,
    HEADS_FILE,
    MANIFEST_FILE,
    STATISTICS_FILE,
    SUPPORTED_VERSIONS,
    BackboneInfo,
    CorrectionInfo,
    Manifest,
    MergeInfo,
    TaskInfo,
)

# A checkpoint may carry these; anything pickled (.bin, .pt, .pkl) is refused.
_BACKBONE_SUFFIXES = {".json", ".safetensors", ".txt", ".model"}


class BundleError(ValueError):
    """A bundle that cannot be used; `file` and `field` say where the problem is."""

    def __init__(self, file: str, field: str | None, message: str) -> None:
        where = file if field is None else f"{file}: {field}"
        super().__init__(f"{where}: {message}")
        self.file, self.field, self.message = file, field, message


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_tensor(file: str, key: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise BundleError(file, key, f"expected shape {shape}, got {tuple(t.shape)}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise BundleError(file, key, "contains NaN or infinite values")


def _validate_content(
    tasks: Sequence[TaskInfo], dim: int, stats: Mapping[str, torch.Tensor], heads: Mapping[str, torch.Tensor]
) -> None:
    """Shapes and values of the tensor files against the manifest (used on write and on load)."""
    T = len(tasks)
    for key in ("n", "e"):
        if key not in stats:
            raise BundleError(STATISTICS_FILE, key, "missing tensor")
    _check_tensor(STATISTICS_FILE, "n", stats["n"], (T,))
    _check_tensor(STATISTICS_FILE, "e", stats["e"], (T,))
    for i, task in enumerate(tasks):
        for key in (f"A.{task.name}", f"B.{task.name}"):
            if key not in stats:
                raise BundleError(STATISTICS_FILE, key, "missing tensor")
            if stats[key].dtype != torch.float64:
                raise BundleError(STATISTICS_FILE, key, f"expected float64, got {stats[key].dtype}")
            _check_tensor(STATISTICS_FILE, key, stats[key], (dim, dim))
        if int(stats["n"][i]) != task.calibration_samples:
            raise BundleError(STATISTICS_FILE, f"n[{i}]", f"{int(stats['n'][i])} samples, manifest says {task.calibration_samples}")
        k = len(task.labels)
        for key, shape in ((f"weight.{task.name}", (k, dim)), (f"bias.{task.name}", (k,))):
            if key not in heads:
                raise BundleError(HEADS_FILE, key, "missing tensor")
            _check_tensor(HEADS_FILE, key, heads[key], shape)


def _copy_backbone(src: Path, dst: Path) -> None:
    if not (src / "config.json").is_file():
        raise BundleError(BACKBONE_DIR, None, f"{src} is not a transformers checkpoint (no config.json)")
    dst.mkdir(parents=True)
    for item in sorted(src.iterdir()):
        if item.is_file() and item.suffix in _BACKBONE_SUFFIXES and item.name != "README.md":
            shutil.copy2(item, dst / item.name)
    if not any(p.suffix == ".safetensors" for p in dst.iterdir()):
        raise BundleError(BACKBONE_DIR, None, f"{src} has no safetensors weights (pickled weights are refused)")


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
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    if not (len(tasks) == len(statistics) == len(heads)):
        raise ValueError(f"got {len(tasks)} tasks, {len(statistics)} statistics and {len(heads)} heads")
    dim = statistics[0].dim
    stats_tensors: dict[str, torch.Tensor] = {
        "n": torch.tensor([s.n for s in statistics], dtype=torch.int64),
        "e": torch.tensor([s.e for s in statistics], dtype=torch.float64),
    }
    head_tensors: dict[str, torch.Tensor] = {}
    for task, s, h in zip(tasks, statistics, heads):
        stats_tensors[f"A.{task.name}"] = s.A.detach().cpu().to(torch.float64).contiguous()
        stats_tensors[f"B.{task.name}"] = s.B.detach().cpu().to(torch.float64).contiguous()
        head_tensors[f"weight.{task.name}"] = h.weight.detach().cpu().float().contiguous()
        head_tensors[f"bias.{task.name}"] = h.bias.detach().cpu().float().contiguous()
    _validate_content(tasks, dim, stats_tensors, head_tensors)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(stats_tensors, str(tmp / STATISTICS_FILE))
        save_file(head_tensors, str(tmp / HEADS_FILE))
        _copy_backbone(Path(backbone_dir), tmp / BACKBONE_DIR)
        files = {
            p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()
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
        with (tmp / MANIFEST_FILE).open("w") as f:
            f.write(manifest.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Move a finished bundle into place; an old one is moved aside first and removed last."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


def _read_manifest(path: Path) -> Manifest:
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise BundleError(MANIFEST_FILE, None, f"missing in {path}")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(MANIFEST_FILE, None, f"not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise BundleError(MANIFEST_FILE, None, "must be a JSON object")
    version = raw.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise BundleError(
            MANIFEST_FILE, "format_version", f"unsupported format version {version!r}; this reprmerge reads {list(SUPPORTED_VERSIONS)}"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or None
        raise BundleError(MANIFEST_FILE, field, err["msg"]) from exc


def _load_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / name))
    except (SafetensorError, OSError) as exc:
        raise BundleError(name, None, f"unreadable safetensors file ({exc})") from exc


def load_bundle(path: str | Path, *, verify_hashes: bool = True) -> Bundle:
    """Load and validate a bundle; any problem raises `BundleError` naming the file and field."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(str(path), None, "bundle directory does not exist")
    manifest = _read_manifest(path)
    for required in (STATISTICS_FILE, HEADS_FILE, f"{BACKBONE_DIR}/config.json"):
        if required not in manifest.files:
            raise BundleError(MANIFEST_FILE, f"files.{required}", "required file is not listed")
    for name, digest in manifest.files.items():
        file = path / name
        if not file.is_file():
            raise BundleError(name, None, "file listed in the manifest is missing")
        if verify_hashes and _sha256(file) != digest:
            raise BundleError(name, None, "sha256 mismatch: the file is damaged or was modified")
    stats = _load_tensors(path, STATISTICS_FILE)
    heads = _load_tensors(path, HEADS_FILE)
    dim = manifest.representation_dim
    _validate_content(manifest.tasks, dim, stats, heads)
    config = json.loads((path / BACKBONE_DIR / "config.json").read_text())
    hidden = config.get("hidden_size")
    if hidden is not None and hidden != dim:
        raise BundleError(f"{BACKBONE_DIR}/config.json", "hidden_size", f"{hidden} differs from representation_dim {dim}")
    names = manifest.task_names
    return Bundle(
        path=path,
        manifest=manifest,
        statistics=[
            TaskStatistics(stats[f"A.{t}"], stats[f"B.{t}"], int(stats["n"][i]), float(stats["e"][i]))
            for i, t in enumerate(names)
        ],
        heads=[TaskHead(heads[f"weight.{t}"], heads[f"bias.{t}"]) for t in names],
    )
