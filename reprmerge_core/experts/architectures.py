"""The allow-list of sequence classifiers whose heads we read, and where each one's head reads.

ReACT corrects the representation a *linear* head reads. A transformers sequence classifier is

    encoder -> pooler output or [CLS] state -> (a stage of the head: Linear + activation) -> final Linear

Decision: an expert's representation is the input of its final Linear (after its stage, if any) and the
bundle's head is that final Linear, so representation + head give the model's own logits (a test per
architecture reproduces them to 1e-5 from a tiny random config). The merged backbone's representation is
where the head starts from (`pooling`): BERT's pooler is part of the encoder, so it is merged like every
encoder layer and both sides read the pooler output. RoBERTa's dense layer, DistilBERT's pre_classifier
and DeBERTa-v2's ContextPooler belong to each expert's head instead: the merged encoder has none, and
each expert's differs, so the merged side reads [CLS] and the correction learns the map from the merged
[CLS] state to each expert's stage output (the calibration statistics fit it; beta and the prior are
cross-validated as for any expert). For these, the uncorrected head on the merged [CLS] (W = I) means
nothing; only corrected heads do. A stage must keep the hidden size (a d x d correction).

Any other architecture is refused by name: guessing where a head reads gave wrong logits silently
(a DistilBERT head read from [CLS] instead of its pre_classifier's ReLU output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN

from reprmerge_core.backbone import Pooling
from reprmerge_core.correction import TaskHead


@dataclass(frozen=True)
class HeadLayout:
    """Where one architecture's head reads: the encoder output, an optional stage, the final Linear."""

    pooling: Pooling
    linear: str  # dotted module name of the final Linear
    reads: str  # the path from the encoder to the logits, in words (for docs and messages)
    stage: str | None = None  # dotted module name of the stage's Linear, applied to `pooling`'s output
    activation: Callable[[PretrainedConfig], torch.nn.Module] | None = None  # the stage's activation


SUPPORTED: dict[str, HeadLayout] = {
    "BertForSequenceClassification": HeadLayout(
        "pooler", "classifier", "pooler output (dense + tanh on [CLS], part of the encoder) -> classifier"),
    "RobertaForSequenceClassification": HeadLayout(
        "cls", "classifier.out_proj", "[CLS] -> classifier.dense + tanh -> classifier.out_proj",
        "classifier.dense", lambda config: torch.nn.Tanh()),
    "DistilBertForSequenceClassification": HeadLayout(
        "cls", "classifier", "[CLS] -> pre_classifier + ReLU -> classifier",
        "pre_classifier", lambda config: torch.nn.ReLU()),
    "DebertaV2ForSequenceClassification": HeadLayout(
        "cls", "classifier", "[CLS] -> ContextPooler (pooler.dense + pooler_hidden_act) -> classifier",
        "pooler.dense", lambda config: ACT2FN[config.pooler_hidden_act]),
}


def supported_list() -> str:
    """The supported heads, for messages: each architecture and where its head reads, and head.safetensors."""
    return "; ".join(f"{name} ({layout.reads})" for name, layout in SUPPORTED.items()) + \
        "; or any encoder with a linear head.safetensors (read with --pooling)"


def unsupported(architecture: str, where: str) -> ValueError:
    return ValueError(f"{where}: architecture {architecture} is not supported (where its head reads is not known). "
                      f"Supported: {supported_list()}")


def _linear(model: PreTrainedModel, name: str, where: str) -> torch.nn.Linear:
    module = model.get_submodule(name)
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"{where}: {type(model).__name__}.{name} is {type(module).__name__}, not a Linear layer")
    return module


def read_classifier(model: PreTrainedModel, where: str) -> tuple[HeadLayout, torch.nn.Module | None, TaskHead]:
    """The layout, the stage (a float32 module on CPU, or None) and the final Linear of a supported classifier."""
    layout = SUPPORTED.get(type(model).__name__)
    if layout is None:
        raise unsupported(type(model).__name__, where)
    linear = _linear(model, layout.linear, where)
    bias = torch.zeros(linear.out_features) if linear.bias is None else linear.bias.detach()
    head = TaskHead(linear.weight.detach().float().clone(), bias.float().clone())
    stage = None
    if layout.stage is not None and layout.activation is not None:
        dense = _linear(model, layout.stage, where)
        hidden = int(model.config.hidden_size)
        if (dense.in_features, dense.out_features) != (hidden, hidden):
            raise ValueError(f"{where}: {layout.stage} maps {dense.in_features} -> {dense.out_features} features; "
                             f"a correctable head needs hidden size -> hidden size ({hidden})")
        copy = torch.nn.Linear(hidden, hidden, bias=dense.bias is not None)
        copy.load_state_dict(dense.state_dict())
        stage = torch.nn.Sequential(copy.float(), layout.activation(model.config)).eval()
    return layout, stage, head
