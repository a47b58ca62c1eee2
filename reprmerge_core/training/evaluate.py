"""Accuracy and macro-F1 of a linear head on a backbone's pooled representations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reprmerge_core.backbone import Backbone
from reprmerge_core.correction import TaskHead
from reprmerge_core.evaluation.metrics import macro_f1


@dataclass(frozen=True)
class HeadEvaluation:
    accuracy: float
    macro_f1: float
    examples: int


def evaluate_head(
    backbone: Backbone,
    head: TaskHead,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    batch_size: int = 64,
    progress: bool | str = False,
) -> HeadEvaluation:
    """Classify `texts` with `head` on `backbone`'s pooled features and score against `labels`."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if head.weight.shape[1] != backbone.dim:
        raise ValueError(f"head input size {head.weight.shape[1]} != backbone representation size {backbone.dim}")
    z = backbone.encode(texts, batch_size=batch_size, progress=progress)
    predictions = (z @ head.weight.to(z).T + head.bias.to(z)).argmax(1).cpu()
    target = torch.as_tensor(list(labels), dtype=torch.long)
    return HeadEvaluation(
        accuracy=float((predictions == target).float().mean()),
        macro_f1=macro_f1(predictions, target),
        examples=len(target),
    )
