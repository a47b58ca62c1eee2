"""The one home of artifact writes and hashes: atomic files and directories, checkpoint hashes, safe suffixes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from reprmerge_core.artifacts import atomic_dir, atomic_file, checkpoint_files, checkpoint_sha256, sha256_file


def _checkpoint(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text('{"a": 1}')
    (path / "model.safetensors").write_bytes(b"weights" * 1000)
    (path / "vocab.txt").write_text("x\ny\n")
    (path / "pytorch_model.bin").write_bytes(b"pickled")
    (path / "README.md").write_text("a model card")
    return path


def test_checkpoint_hash_is_the_sha256_of_its_safe_files_in_name_order(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt")
    assert [p.name for p in checkpoint_files(ckpt)] == ["config.json", "model.safetensors", "vocab.txt"]
    names = ("config.json", "model.safetensors", "vocab.txt")  # pickles and prose are neither copied nor hashed
    want = hashlib.sha256(b"".join((ckpt / n).read_bytes() for n in names)).hexdigest()
    assert checkpoint_sha256(ckpt) == want
    weights = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert checkpoint_sha256(ckpt, suffixes=(".safetensors",)) == weights == sha256_file(ckpt / "model.safetensors")


def test_checkpoint_hash_sees_a_changed_file_despite_the_memo(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt")
    before = checkpoint_sha256(ckpt)
    (ckpt / "vocab.txt").write_text("x\nz\n")  # same size: the memo key changes through the mtime
    os.utime(ckpt / "vocab.txt", ns=(1, 1))
    assert checkpoint_sha256(ckpt) != before


def test_a_checkpoint_without_hashable_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        checkpoint_sha256(tmp_path / "empty")


def test_atomic_file_replaces_whole_or_leaves_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "shard.safetensors"
    with atomic_file(out) as tmp:
        tmp.write_text("first")
    assert out.read_text() == "first"

    def crash() -> None:
        with atomic_file(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash"):
        crash()
    assert out.read_text() == "first"
    assert sorted(p.name for p in out.parent.iterdir()) == ["shard.safetensors"]  # no temporary left behind


def test_atomic_dir_replaces_or_keeps_an_existing_one(tmp_path: Path) -> None:
    out = tmp_path / "entry"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("ours")
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "new"
    with atomic_dir(out, keep_existing=True) as tmp:  # another writer published first: its copy wins
        (tmp / "f").write_text("late")
    assert (out / "f").read_text() == "new"

    def crash() -> None:
        with atomic_dir(tmp_path / "crashed") as tmp:
            (tmp / "f").write_text("half")
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash"):
        crash()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
