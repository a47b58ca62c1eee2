"""Versioned, integrity-checked bundles: a merged backbone, per-task statistics and task heads.

The schema (`manifest`) and the validation (`check`) import without torch; `Bundle`, `load_bundle` and
`write_bundle` (in `io`, which builds tensors) load on first use, so `reprmerge inspect` never pays for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from reprmerge_core.bundle.check import BundleError, CheckedBundle, check_bundle
from reprmerge_core.bundle.manifest import FORMAT_VERSION, Manifest, TaskInfo

if TYPE_CHECKING:
    from reprmerge_core.bundle.io import Bundle, load_bundle, write_bundle

_IO = ("Bundle", "load_bundle", "write_bundle")

__all__ = ["FORMAT_VERSION", "Bundle", "BundleError", "CheckedBundle", "Manifest", "TaskInfo", "check_bundle",
           "load_bundle", "write_bundle"]


def __getattr__(name: str) -> Any:
    if name in _IO:
        return getattr(importlib.import_module("reprmerge_core.bundle.io"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
