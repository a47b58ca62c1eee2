"""Artifacts on disk: written never into an input, never over an existing output unasked, never half-written;
hashed one way; checkpoints read only from files that cannot run code.

Every writer of a directory or file (bundles, merged checkpoints, the expert cache, calibration shards) and
every content hash of a file or checkpoint goes through here (one home), so a mistyped `--out` can neither
destroy an expert nor leave a partial checkpoint behind, and two hashes of the same checkpoint always agree.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

# The files of a transformers checkpoint worth keeping (weights, config, tokenizer); anything pickled
# (.bin, .pt, .pkl) is refused, since unpickling runs code.
CHECKPOINT_SUFFIXES = frozenset({".json", ".safetensors", ".txt", ".model"})
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of one file's bytes, read in 1 MiB chunks (weights files are hundreds of MB)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(checkpoint: str | Path, suffixes: Iterable[str] = CHECKPOINT_SUFFIXES) -> list[Path]:
    """The checkpoint directory's files with one of `suffixes`, in name order (by default nothing pickled)."""
    keep = frozenset(suffixes)
    return sorted(p for p in Path(checkpoint).iterdir() if p.is_file() and p.suffix in keep)


@functools.lru_cache(maxsize=16)
def _files_sha256(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    return h.hexdigest()


def checkpoint_sha256(checkpoint: str | Path, suffixes: Iterable[str] = CHECKPOINT_SUFFIXES) -> str:
    """Hex sha256 over the bytes of the checkpoint's files with one of `suffixes`, in name order.

    Memoised per (path, size, mtime) of every file: a build hashes the same 100+ MB base several times.
    `suffixes=(".safetensors",)` hashes the weights alone (the expert cache's key: a new tokenizer file
    must not retrain experts). FileNotFoundError when no such file exists: an empty hash would match anything.
    """
    files = checkpoint_files(checkpoint, suffixes)
    if not files:
        raise FileNotFoundError(f"{checkpoint} holds no {'/'.join(sorted(suffixes))} files to hash")
    return _files_sha256(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def check_output(out: str | Path, inputs: Mapping[str, str | Path], *, overwrite: bool) -> Path:
    """`out` if it may be written: refused (ValueError) when it is, contains or lies inside one of `inputs`
    (name -> path, e.g. "expert sms" -> its folder) whatever `overwrite` says; FileExistsError when it
    exists and is not an empty directory (nothing to lose there) and `overwrite` is false. Call it before
    any work, so a refusal costs nothing."""
    target = Path(out).resolve()
    for name, path in inputs.items():
        source = Path(path).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ValueError(f"output {out} overlaps the {name} at {path}: refusing to write into an input")
    if target.exists() and not overwrite and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(f"{out} exists; add --overwrite to replace it (overwrite=True from Python)")
    return Path(out)


def temp_dir_beside(out: Path) -> Path:
    """A new hidden sibling of `out` to write into, made as any folder is (mode 0o777 less the umask):
    `tempfile.mkdtemp` makes it owner-only, and the rename would hand that on to the finished output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(6)}")
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        return tmp


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished directory into place; an old one is moved aside first and removed last."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


@contextmanager
def atomic_dir(out: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """A temporary sibling of `out` to write into; renamed to `out` when the block ends cleanly, removed
    when it raises (a crash leaves at most a hidden `.NAME.tmp-*` folder, never a partial `out`).

    `keep_existing`: when another process published `out` first (a content-addressed cache entry written
    twice), its copy wins and ours is discarded; otherwise an existing `out` is replaced.
    """
    out = Path(out)
    tmp = temp_dir_beside(out)
    try:
        yield tmp
        if not keep_existing:
            replace_dir(tmp, out)
        else:
            try:
                os.rename(tmp, out)
            except OSError:
                if not out.is_dir():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; ours after an error or a lost race


@contextmanager
def atomic_file(out: str | Path) -> Iterator[Path]:
    """A temporary sibling path of the file `out` to write to; moved over `out` when the block ends cleanly,
    removed when it raises, so a reader sees the old file or the whole new one, never part of it. The writer
    creates the file, so it gets the usual mode (`tempfile.mkstemp` would make it owner-only)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(6)}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
