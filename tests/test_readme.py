"""The README's Python blocks run as written, against a bundle with the tasks they name."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from reprmerge_core.export import export_onnx
from tests.helpers import make_random_bundle

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.DOTALL | re.MULTILINE)
# The tasks the blocks name, with the tiny suite's labels; statistics are random (the blocks read shapes, not values).
TASKS = {"sms_spam": ["ham", "spam"], "trec6": ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"],
         "movie_sentiment": ["negative", "positive"]}


def test_the_readme_has_python_blocks() -> None:
    assert BLOCKS


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(block: str, tmp_path: Path, tiny_backbone_dir: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block in a fresh namespace (so a missing import fails), from a folder holding `bundle/`."""
    make_random_bundle(tmp_path / "bundle", tiny_backbone_dir, torch.Generator().manual_seed(0), tasks=TASKS)
    if "exported/" in block:  # the export section's block reads what `reprmerge export` wrote
        export_onnx(tmp_path / "bundle", {"sms_spam": 2, "trec6": 1}, tmp_path / "exported")
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README's own code
    assert printed.getvalue().strip(), "a README block that prints nothing shows the reader nothing"
