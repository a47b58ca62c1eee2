"""Bundle validation without torch (schema, sha256 of every file, shapes, dtypes and values of the tensor files).

`load_bundle` and `write_bundle` run these checks and then build tensors; `reprmerge inspect` runs them alone,
so it answers in well under a second. Tensors are read with safetensors' numpy loader: nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load_file

from reprmerge_core.artifacts import sha256_file
from reprmerge_core.bundle.manifest import (
    BACKBONE_DIR,
    HEADS_FILE,
    MANIFEST_FILE,
    STATISTICS_FILE,
    SUPPORTED_VERSIONS,
    Manifest,
    TaskInfo,
)


class BundleError(ValueError):
    """A bundle that cannot be used; `file` and `field` say where the problem is."""

    def __init__(self, file: str, field: str | None, message: str) -> None:
        where = file if field is None else f"{file}: {field}"
        super().__init__(f"{where}: {message}")
        self.file, self.field, self.message = file, field, message


@dataclass(frozen=True)
class CheckedBundle:
    """A bundle directory whose manifest, files and tensors passed every check; arrays as read from disk."""

    path: Path
    manifest: Manifest
    statistics: dict[str, np.ndarray]
    heads: dict[str, np.ndarray]


def _check_array(file: str, key: str, a: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(a.shape) != shape:
        raise BundleError(file, key, f"expected shape {shape}, got {tuple(a.shape)}")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise BundleError(file, key, "contains NaN or infinite values")


def validate_content(
    tasks: Sequence[TaskInfo], dim: int, stats: Mapping[str, np.ndarray], heads: Mapping[str, np.ndarray]
) -> None:
    """Shapes and values of the tensor files against the manifest (used on write and on load)."""
    T = len(tasks)
    for key in ("n", "e"):
        if key not in stats:
            raise BundleError(STATISTICS_FILE, key, "missing tensor")
    _check_array(STATISTICS_FILE, "n", stats["n"], (T,))
    _check_array(STATISTICS_FILE, "e", stats["e"], (T,))
    for i, task in enumerate(tasks):
        for key in (f"A.{task.name}", f"B.{task.name}"):
            if key not in stats:
                raise BundleError(STATISTICS_FILE, key, "missing tensor")
            if stats[key].dtype != np.float64:
                raise BundleError(STATISTICS_FILE, key, f"expected float64, got {stats[key].dtype}")
            _check_array(STATISTICS_FILE, key, stats[key], (dim, dim))
        if int(stats["n"][i]) != task.calibration_samples:
            raise BundleError(STATISTICS_FILE, f"n[{i}]",
                              f"{int(stats['n'][i])} samples, manifest says {task.calibration_samples}")
        k = len(task.labels)
        for key, shape in ((f"weight.{task.name}", (k, dim)), (f"bias.{task.name}", (k,))):
            if key not in heads:
                raise BundleError(HEADS_FILE, key, "missing tensor")
            _check_array(HEADS_FILE, key, heads[key], shape)


def read_manifest(path: Path) -> Manifest:
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
            MANIFEST_FILE, "format_version",
            f"unsupported format version {version!r}; this reprmerge reads {list(SUPPORTED_VERSIONS)}",
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or None
        raise BundleError(MANIFEST_FILE, field, err["msg"]) from exc


def _load_arrays(path: Path, name: str) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path / name))
    except (SafetensorError, OSError) as exc:
        raise BundleError(name, None, f"unreadable safetensors file ({exc})") from exc


def check_bundle(path: str | Path, *, verify_hashes: bool = True) -> CheckedBundle:
    """Validate a bundle directory; any problem raises `BundleError` naming the file and field."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(str(path), None, "bundle directory does not exist")
    manifest = read_manifest(path)
    for required in (STATISTICS_FILE, HEADS_FILE, f"{BACKBONE_DIR}/config.json"):
        if required not in manifest.files:
            raise BundleError(MANIFEST_FILE, f"files.{required}", "required file is not listed")
    for name, digest in manifest.files.items():
        file = path / name
        if not file.is_file():
            raise BundleError(name, None, "file listed in the manifest is missing")
        if verify_hashes and sha256_file(file) != digest:
            raise BundleError(name, None, "sha256 mismatch: the file is damaged or was modified")
    stats = _load_arrays(path, STATISTICS_FILE)
    heads = _load_arrays(path, HEADS_FILE)
    dim = manifest.representation_dim
    validate_content(manifest.tasks, dim, stats, heads)
    config = json.loads((path / BACKBONE_DIR / "config.json").read_text())
    hidden = config.get("hidden_size")
    if hidden is not None and hidden != dim:
        raise BundleError(f"{BACKBONE_DIR}/config.json", "hidden_size",
                          f"{hidden} differs from representation_dim {dim}")
    return CheckedBundle(path, manifest, stats, heads)
