"""Writing outputs a user owns: never into an input, never over an existing output unasked, never half-written.

Every command that writes a directory goes through here (one home), so a mistyped `--out` can neither
destroy an expert nor leave a partial checkpoint behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


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
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
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
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """A temporary sibling of `out` to write into; renamed to `out` when the block ends cleanly, removed
    when it raises (a crash leaves at most a hidden `.NAME.tmp-*` folder, never a partial `out`)."""
    out = Path(out)
    tmp = temp_dir_beside(out)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
