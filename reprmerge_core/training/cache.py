"""Content-addressed cache of trained experts, so a rebuild with the same inputs skips training.

An entry's key hashes everything that determines the expert: the base checkpoint's weights, the
task and its training examples, the split and the recipe, and the library versions. Entries are
written into a temporary sibling directory and renamed into place, so a reader never sees half
of one and an interrupted build leaves nothing that looks complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

import reprmerge_core
from reprmerge_core.artifacts import temp_dir_beside

CACHE_ENV = "REPRMERGE_CACHE"


def cache_root(override: str | Path | None = None) -> Path:
    """`override`, else $REPRMERGE_CACHE, else ~/.cache/reprmerge/experts."""
    if override is not None:
        return Path(override)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "reprmerge" / "experts"


@functools.lru_cache(maxsize=8)
def _weights_digest(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_digest(checkpoint: Path) -> str:
    """sha256 over the checkpoint's safetensors files (memoised per path, size and mtime)."""
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint} holds no *.safetensors weights")
    return _weights_digest(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def library_versions() -> dict[str, str]:
    """Versions of the code that trains: a new release may train differently, so it changes the key."""
    return {
        "reprmerge": reprmerge_core.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def cache_key(inputs: dict[str, Any]) -> str:
    """Hex digest of the JSON-serialised inputs plus `library_versions()`."""
    payload = json.dumps({"inputs": inputs, "versions": library_versions()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def build_once(entry: Path, write: Callable[[Path], None]) -> bool:
    """Create `entry` with `write(tmp_dir)` then an atomic rename; False (no work) when it exists.

    If another process publishes the same entry first, its copy wins and ours is discarded.
    """
    if entry.is_dir():
        return False
    tmp = temp_dir_beside(entry)
    try:
        write(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
