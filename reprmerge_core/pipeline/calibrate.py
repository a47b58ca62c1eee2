"""`reprmerge calibrate`: a bundle from a user's own merged backbone, expert checkpoints and inputs.

An expert is a transformers checkpoint whose task head is either
- a `head.safetensors` beside it (`weight` (classes, d), `bias` (classes,)), label names from its
  `expert.json` "labels" or the config's id2label; representations use `pooling` (default mean), or
- its own sequence-classification layer (`classifier`, an nn.Linear, as in BertForSequenceClassification),
  read with the representation that layer reads: the model's pooler output where it has one, else [CLS].
Everything is checked before any forward pass: architecture, representation size, vocabulary, heads,
and that calibration inputs are given for exactly the experts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from reprmerge_core.backbone import Backbone, Pooling, select_device
from reprmerge_core.bundle import write_bundle
from reprmerge_core.bundle.manifest import BackboneInfo, CorrectionInfo, MergeInfo, TaskInfo
from reprmerge_core.calibration import collect_statistics, select_beta
from reprmerge_core.correction import TaskHead
from reprmerge_core.correction.solver import Normalisation
from reprmerge_core.merging.checkpoints import compatibility_problems

HEAD_FILE = "head.safetensors"


@dataclass(frozen=True)
class ExpertSource:
    """How one expert's representation and head are read."""

    name: str
    path: Path
    head: TaskHead
    labels: list[str]
    pooling: Pooling


def _label_names(path: Path, classes: int) -> list[str]:
    info = path / "expert.json"
    if info.is_file() and isinstance(json.loads(info.read_text()).get("labels"), list):
        labels = [str(x) for x in json.loads(info.read_text())["labels"]]
    else:
        id2label = AutoConfig.from_pretrained(path, local_files_only=True).id2label or {}
        # a config's id2label names this head only when it has one entry per class
        labels = [str(id2label[i]) for i in range(classes)] if set(id2label) == set(range(classes)) else [str(i) for i in range(classes)]
    if len(labels) != classes:
        raise ValueError(f"expert {path}: {len(labels)} label names for a head with {classes} classes")
    return labels if len(set(labels)) == classes else [str(i) for i in range(classes)]


def read_expert(name: str, path: str | Path, pooling: Pooling) -> ExpertSource:
    """The head and representation of one expert checkpoint (see the module docstring)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"expert {name!r}: {path} is not a transformers checkpoint (no config.json)")
    if (path / HEAD_FILE).is_file():
        tensors = load_file(str(path / HEAD_FILE))
        if set(tensors) != {"weight", "bias"}:
            raise ValueError(f"expert {name!r}: {HEAD_FILE} must hold exactly 'weight' and 'bias', has {sorted(tensors)}")
        head = TaskHead(tensors["weight"].float(), tensors["bias"].float())
        return ExpertSource(name, path, head, _label_names(path, head.num_classes), pooling)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        raise ValueError(f"expert {name!r}: {path} has neither {HEAD_FILE} nor a sequence-classification head")
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, torch.nn.Linear):
        raise ValueError(f"expert {name!r}: its classification head is not a single linear layer; "
                         f"export it as {HEAD_FILE} with the representation it reads")
    has_pooler = getattr(model.base_model, "pooler", None) is not None
    head = TaskHead(classifier.weight.detach().float().clone(), classifier.bias.detach().float().clone())
    return ExpertSource(name, path, head, _label_names(path, head.num_classes), "pooler" if has_pooler else "cls")


def calibrate_bundle(
    backbone: str | Path,
    experts: Mapping[str, str | Path],
    calibration: Mapping[str, Sequence[str]],
    out: str | Path,
    *,
    pooling: Pooling = "mean",
    max_length: int = 128,
    beta: float | str = "auto",
    normalisation: Normalisation = Normalisation.ENERGY,
    folds: int = 5,
    merge_method: str = "unknown",
    device: str = "auto",
    batch_size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Statistics of `backbone` (already merged) against each expert on its task's inputs, as a bundle."""
    backbone = Path(backbone)
    if not experts:
        raise ValueError("at least one --expert is needed")
    if set(calibration) != set(experts):
        raise ValueError(f"calibration inputs are needed for exactly the experts {sorted(experts)}; "
                         f"got {sorted(calibration)}")
    for name, texts in calibration.items():
        if len(texts) < folds:
            raise ValueError(f"calibration for {name!r} has {len(texts)} inputs; at least {folds} are needed")
    problems = compatibility_problems(backbone, {n: Path(p) for n, p in experts.items()})
    if problems:
        raise ValueError("experts do not match the backbone:\n  " + "\n  ".join(problems))
    sources = [read_expert(name, path, pooling) for name, path in experts.items()]
    poolings = {s.pooling for s in sources}
    if len(poolings) != 1:
        raise ValueError(f"experts read different representations ({sorted(poolings)}); one bundle needs one pooling")
    shared_pooling = poolings.pop()
    dev = select_device(device)
    merged = Backbone.from_pretrained(backbone, pooling=shared_pooling, max_length=max_length, device=dev)
    for s in sources:
        if s.head.weight.shape[1] != merged.dim:
            raise ValueError(f"expert {s.name!r}: head input size {s.head.weight.shape[1]} != representation size {merged.dim}")
    models = [Backbone.from_pretrained(s.path, pooling=shared_pooling, max_length=max_length, device=dev) for s in sources]
    stats = collect_statistics(merged, models, [list(calibration[s.name]) for s in sources],
                               folds=folds, batch_size=batch_size, progress=progress)
    start = time.perf_counter()
    selection = select_beta([[x.to("cpu") for x in task] for task in stats.folds], normalisation=normalisation)
    chosen = selection.beta if beta == "auto" else float(beta)
    return write_bundle(
        out,
        tasks=[TaskInfo(name=s.name, labels=s.labels, calibration_samples=n) for s, n in zip(sources, stats.samples)],
        statistics=[x.to("cpu") for x in stats.total],
        heads=[s.head for s in sources],
        backbone_dir=backbone,
        correction=CorrectionInfo(beta=chosen, normalisation=normalisation,
                                  beta_selection={"chosen": beta == "auto", **selection.as_dict()}),
        merge=MergeInfo(method=merge_method),
        backbone=BackboneInfo(source=str(backbone), pooling=shared_pooling, max_length=max_length),
        extra={"timings": {"statistics_forward": stats.forward_seconds, "statistics_accumulate": stats.accumulate_seconds,
                           "beta_selection": time.perf_counter() - start},
               "statistics_per_task_seconds": stats.task_seconds,
               "experts": {s.name: str(s.path) for s in sources}},
        overwrite=overwrite,
    )
