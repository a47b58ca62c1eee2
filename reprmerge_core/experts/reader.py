"""Reading a user's expert checkpoint: its head, its label names and the representation that head reads.

An expert is a local transformers checkpoint (safetensors, see `reprmerge_core.checks`) whose task head is
- a `head.safetensors` beside it (`weight` (classes, d), `bias` (classes,)), label names from its
  `expert.json` "labels" or the config's id2label; representations use the caller's pooling, or
- its own sequence-classification head, for the architectures in `architectures.SUPPORTED` only, read
  where that architecture's head reads (see `architectures`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from reprmerge_core.backbone import Backbone, Pooling, quiet_transformers
from reprmerge_core.checks import checkpoint_dir
from reprmerge_core.correction import TaskHead
from reprmerge_core.experts.architectures import SUPPORTED, read_classifier, unsupported

HEAD_FILE = "head.safetensors"


@dataclass(frozen=True)
class ExpertSource:
    """How one expert's representation and head are read: `pooling` of its encoder, then `stage` if any."""

    name: str
    path: Path
    head: TaskHead
    labels: list[str]
    pooling: Pooling
    stage: torch.nn.Module | None = None

    def backbone(self, *, max_length: int, device: str | torch.device = "auto") -> Backbone:
        """The expert's encoder computing the representation its head reads."""
        return Backbone.from_pretrained(self.path, pooling=self.pooling, max_length=max_length, device=device,
                                        stage=self.stage)


def _label_names(path: Path, classes: int) -> list[str]:
    info = path / "expert.json"
    recorded = json.loads(info.read_text()).get("labels") if info.is_file() else None
    if isinstance(recorded, list):
        labels = [str(x) for x in recorded]
    else:
        id2label = AutoConfig.from_pretrained(path, local_files_only=True).id2label or {}
        # a config's id2label names this head only when it has one entry per class
        labels = ([str(id2label[i]) for i in range(classes)] if set(id2label) == set(range(classes))
                  else [str(i) for i in range(classes)])
    if len(labels) != classes:
        raise ValueError(f"expert {path}: {len(labels)} label names for a head with {classes} classes")
    return labels if len(set(labels)) == classes else [str(i) for i in range(classes)]


def _classifiers(path: Path) -> list[str]:
    """The sequence-classification architectures the checkpoint's config names."""
    architectures = AutoConfig.from_pretrained(path, local_files_only=True).architectures or []
    return [a for a in architectures if a.endswith("ForSequenceClassification")]


def has_head(path: Path) -> bool:
    """Whether the checkpoint at `path` carries a task head (`read_expert` reads it or names why not)."""
    return (path / HEAD_FILE).is_file() or ((path / "config.json").is_file() and bool(_classifiers(path)))


def read_expert(name: str, path: str | Path, pooling: Pooling) -> ExpertSource:
    """The head and representation of one expert checkpoint (see the module docstring); refuses, naming the
    expert, a path that is not a safetensors checkpoint and a classifier whose architecture is not supported."""
    where = f"expert {name!r} ({path})"
    path = checkpoint_dir(path, f"expert {name!r}")
    if (path / HEAD_FILE).is_file():
        tensors = load_file(str(path / HEAD_FILE))
        if set(tensors) != {"weight", "bias"}:
            raise ValueError(f"{where}: {HEAD_FILE} must hold exactly 'weight' and 'bias', has {sorted(tensors)}")
        head = TaskHead(tensors["weight"].float(), tensors["bias"].float())
        return ExpertSource(name, path, head, _label_names(path, head.num_classes), pooling)
    classifiers = _classifiers(path)
    if not classifiers:
        raise ValueError(f"{where}: has neither {HEAD_FILE} nor a sequence-classification head")
    unknown = [a for a in classifiers if a not in SUPPORTED]
    if unknown:
        raise unsupported(unknown[0], where)  # before loading any weights
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, use_safetensors=True)
    layout, stage, head = read_classifier(model, where)
    return ExpertSource(name, path, head, _label_names(path, head.num_classes), layout.pooling, stage)
