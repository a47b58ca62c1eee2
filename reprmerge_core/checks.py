"""What a user hands in, checked before any work: task names and local checkpoint directories.

One rule per concept, used by every command (merge, calibrate, build, evaluate) and by the library calls
behind them, so a mistake costs nothing and its message names the input it came from:
- a task name is `TASK_NAME_PATTERN` (it becomes a tensor key, a file-safe name and a bundle manifest
  field, which validates with the same pattern);
- a checkpoint is a local directory with a config.json and safetensors weights. It is never looked up on
  the Hugging Face Hub (a mistyped path would otherwise come back as a Hub error naming neither the path
  nor the option), and pickle weights (`pytorch_model.bin`) are never loaded: unpickling runs code from
  the file, so the message gives the one-line conversion to safetensors instead.
Pure checks on names and files: no torch, no transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

TASK_NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"  # letters, digits, _ . - (they key tensors, files and URLs)
_TASK_NAME = re.compile(TASK_NAME_PATTERN)
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def task_name_problem(name: str) -> str | None:
    """What is wrong with `name` as a task name (None: nothing)."""
    if _TASK_NAME.fullmatch(name):
        return None
    return f"task name {name!r} may only use ASCII letters, digits, '_', '.' and '-' (it names tensors and files)"


def check_task_name(name: str, where: str) -> str:
    """`name` if it is a valid task name (`task_name_problem`); else a ValueError naming `where`."""
    problem = task_name_problem(name)
    if problem is not None:
        raise ValueError(f"{where}: {problem}")
    return name


def check_task_names(names: Iterable[str], where: str) -> list[str]:
    """Every name checked by `check_task_name`."""
    return [check_task_name(name, where) for name in names]


def conversion_command(path: Path) -> str:
    """One shell line that re-saves the pickle-weight checkpoint at `path` with safetensors weights beside them.

    transformers does the loading (its own restricted unpickling, single or sharded files) and the saving
    (safetensors by default; tied weights handled), so reprmerge itself never reads a pickle.
    """
    loader = "AutoModelForSequenceClassification" if _has_classifier(path) else "AutoModel"
    return (f"python -c \"from transformers import {loader} as M; d = {str(path)!r}; "
            "M.from_pretrained(d, use_safetensors=False).save_pretrained(d, safe_serialization=True)\"")


def _has_classifier(path: Path) -> bool:
    try:
        architectures = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in architectures)


def checkpoint_problem(path: Path) -> str | None:
    """What keeps `path` from being a local checkpoint directory with safetensors weights (None: nothing)."""
    if not path.exists():
        return (f"{path} does not exist (a local checkpoint directory is needed; models are never downloaded "
                "from the Hugging Face Hub)")
    if not path.is_dir():
        return f"{path} is a file, not a checkpoint directory"
    if not (path / "config.json").is_file():
        return f"{path} is not a transformers checkpoint (no config.json)"
    if not any((path / name).is_file() for name in SAFE_WEIGHTS):
        if any((path / name).is_file() for name in PICKLE_WEIGHTS):
            return (f"{path} holds pickle weights (pytorch_model.bin), which reprmerge never loads (unpickling runs "
                    f"code from the file). Convert them once, with transformers, to model.safetensors:\n    "
                    f"{conversion_command(path)}")
        return f"{path} has no safetensors weights (model.safetensors)"
    return None


def checkpoint_dir(path: str | Path, role: str) -> Path:
    """`path` as a local checkpoint directory with safetensors weights, else a ValueError naming `role`
    (e.g. "--expert sms=experts/sms", "expert 'sms'", "--base") and what is wrong with the path."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"{role}: {problem}")
    return path
