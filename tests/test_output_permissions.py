"""Outputs are written through a temporary sibling and renamed; they must end up with the permissions any folder
the user makes gets (mode 0o777 less the umask), not tempfile's owner-only 0o700."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from reprmerge_core.artifacts import atomic_dir, atomic_file
from reprmerge_core.training.cache import build_once
from tests.helpers import make_random_bundle


@pytest.fixture(params=[0o022, 0o027])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_bundle_merged_checkpoint_and_cache_folders_follow_the_umask(tmp_path: Path, tiny_backbone_dir: Path,
                                                                    umask: int) -> None:
    expected = 0o777 & ~umask  # 0o755 under the usual 022: others may read and serve the bundle
    bundle = make_random_bundle(tmp_path / "bundle", tiny_backbone_dir, generator=torch.Generator().manual_seed(0))
    assert mode(bundle) == expected
    assert mode(bundle / "manifest.json") == 0o666 & ~umask
    with atomic_dir(tmp_path / "merged") as tmp:  # what `merge --out` writes through
        (tmp / "config.json").write_text("{}")
    assert mode(tmp_path / "merged") == expected
    assert build_once(tmp_path / "cache" / "entry", lambda tmp: (tmp / "x").write_text("1"))
    assert mode(tmp_path / "cache" / "entry") == expected
    with atomic_file(tmp_path / "shard.safetensors") as tmp:  # what `calibrate --shard` writes through
        tmp.write_bytes(b"x")
    assert mode(tmp_path / "shard.safetensors") == 0o666 & ~umask
    assert not [p.name for p in tmp_path.rglob(".*tmp-*")]  # no temporary sibling left behind
