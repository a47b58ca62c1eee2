"""Accuracy and macro-F1 of a linear head on a backbone's pooled representations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reprmerge_core.backbone import Backbone
from reprmerge_core.correction import TaskHead


@dataclass(frozen=True)
class HeadEvaluation:
    accuracy: float
    macro_f1: float
    examples: int


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN) over classes seen in labels or predictions.

    Same convention as scikit-learn's default `f1_score(average="macro")` (not installed here), so a
    class the head never predicts counts as F1 0 rather than vanishing from the average.
    """
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must be equal 1-D")
    if labels.numel() == 0:
        raise ValueError("macro-F1 of zero examples is undefined")
    scores = []
    for c in torch.unique(torch.cat([predictions, labels])):
        tp = int(((predictions == c) & (labels == c)).sum())
        wrong = int((predictions == c).sum()) + int((labels == c).sum()) - 2 * tp  # FP + FN
        scores.append(2 * tp / (2 * tp + wrong))
    return sum(scores) / len(scores)


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
