"""Fine-tuning one expert per task from the backbone, cached on disk by a hash of its inputs.

An expert directory holds a transformers checkpoint of the encoder (safetensors, with tokenizer
files, loadable by `AutoModel.from_pretrained`), `head.safetensors` (weight (classes, d), bias
(classes,)) and `expert.json` (task, labels, recipe, split, base weights hash, training record).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from reprmerge_core.backbone import Backbone, default_backbone_path, pool
from reprmerge_core.correction import TaskHead
from reprmerge_core.data import Task, TaskSplits
from reprmerge_core.training.cache import build_once, cache_key, cache_root, library_versions, weights_digest
from reprmerge_core.training.recipe import TrainRecipe

EXPERT_FILE = "expert.json"
HEAD_FILE = "head.safetensors"
EXPERT_FORMAT = "reprmerge-expert"
TRAINING_VERSION = 2
"""Part of the cache key; bump when `_fit` trains differently for the same inputs.

1: every task trained with `recipe.seed` (entries without this field); 2: the seed comes from `TrainRecipe.task_seed`.
"""


@dataclass(frozen=True)
class Expert:
    """A trained expert on disk; `trained` is False when it came from the cache without training."""

    path: Path
    head: TaskHead
    info: dict[str, Any]
    trained: bool = False

    @property
    def task(self) -> str:
        return str(self.info["task"])

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.info["labels"])

    @property
    def stage(self) -> None:
        """Nothing between pooling and the head: our experts' heads read the pooled representation."""
        return None

    @property
    def recipe(self) -> TrainRecipe:
        return TrainRecipe.model_validate(self.info["recipe"])

    def backbone(self, device: str | torch.device = "auto") -> Backbone:
        """The fine-tuned encoder with the pooling and max length it was trained with."""
        recipe = self.recipe
        return Backbone.from_pretrained(self.path, pooling=recipe.pooling, max_length=recipe.max_length, device=device)


def load_expert(path: str | Path, *, trained: bool = False) -> Expert:
    """Read an expert directory written by `train_expert`."""
    path = Path(path)
    info = json.loads((path / EXPERT_FILE).read_text())
    if info.get("format") != EXPERT_FORMAT:
        raise ValueError(f"{path / EXPERT_FILE}: field 'format' is {info.get('format')!r}, expected {EXPERT_FORMAT!r}")
    tensors = load_file(str(path / HEAD_FILE))
    head = TaskHead(tensors["weight"], tensors["bias"])
    if head.num_classes != len(info["labels"]):
        raise ValueError(f"{path / HEAD_FILE}: {head.num_classes} head rows but {len(info['labels'])} labels")
    return Expert(path, head, info, trained)


def _data_digest(task: Task) -> str:
    """sha256 of the exact training examples, so a changed data package or split cannot reuse an entry."""
    return hashlib.sha256(json.dumps([task.texts, task.labels, task.label_names]).encode()).hexdigest()


def _fit(
    backbone: Backbone, train: Task, recipe: TrainRecipe, seed: int, progress: bool
) -> tuple[TaskHead, list[float], float]:
    """Train encoder and a fresh linear head jointly (cross-entropy, AdamW, warmup then linear decay).

    `seed` sets the head's initialisation and the batch order. Returns the head, the loss of every step
    and the accuracy over the last epoch's batches (measured in training mode, as they went by, so it
    costs no extra forward pass).
    """
    torch.manual_seed(seed)
    model, device = backbone.model, backbone.device
    if recipe.freeze_embeddings:
        model.embeddings.requires_grad_(False)
    head = torch.nn.Linear(backbone.dim, train.num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    total = math.ceil(len(train) / recipe.batch_size) * recipe.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(recipe.warmup_fraction * total), total)
    order_rng = torch.Generator().manual_seed(seed)
    labels = torch.tensor(train.labels)
    class_weight = None
    if recipe.class_weights == "balanced":
        counts = torch.bincount(labels, minlength=train.num_classes).clamp_min(1)
        class_weight = (len(labels) / (train.num_classes * counts)).float().to(device)
    losses: list[float] = []
    model.train()
    with tqdm(total=total, desc=f"train {train.name}", unit="step", disable=not progress) as bar:
        for _ in range(recipe.epochs):
            correct = 0
            for idx in torch.randperm(len(train), generator=order_rng).split(recipe.batch_size):
                batch = {k: v.to(device) for k, v in backbone.tokenize([train.texts[i] for i in idx]).items()}
                logits = head(pool(model(**batch), batch["attention_mask"], recipe.pooling))
                y = labels[idx].to(device)
                loss = F.cross_entropy(logits, y, weight=class_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                correct += int((logits.argmax(1) == y).sum())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
    model.eval()
    return TaskHead(head.weight.detach().cpu(), head.bias.detach().cpu()), losses, correct / len(train)


def train_expert(
    splits: TaskSplits,
    recipe: TrainRecipe,
    *,
    task_index: int = 0,
    base: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> Expert:
    """The expert for `splits.train` under `recipe`, trained from `base` unless already cached.

    `task_index` (the task's position in its suite) picks the seed, `recipe.task_seed(task_index)`, so
    the experts of one suite start from different heads. `base` defaults to the packaged
    all-MiniLM-L6-v2; `cache_dir` to `cache_root()`. The device is not part of the key: an expert
    trained on GPU serves a CPU rebuild.
    """
    base = Path(base) if base is not None else default_backbone_path()
    seed = recipe.task_seed(task_index)
    inputs = {
        "task": splits.name,
        "labels": list(splits.label_names),
        "train_sha256": _data_digest(splits.train),
        "split": splits.config.model_dump(),
        "recipe": recipe.cache_fields(),
        "base_weights_sha256": weights_digest(base),
        "seed": seed,
        "training_version": TRAINING_VERSION,
    }
    key = cache_key(inputs)
    entry = cache_root(cache_dir) / f"{splits.name}-{key[:16]}"

    def write(tmp: Path) -> None:
        backbone = Backbone.from_pretrained(base, pooling=recipe.pooling, max_length=recipe.max_length, device=device)
        start = time.perf_counter()
        head, losses, accuracy = _fit(backbone, splits.train, recipe, seed, progress)
        seconds = time.perf_counter() - start
        backbone.save(tmp)
        save_file({"weight": head.weight.contiguous(), "bias": head.bias.contiguous()}, str(tmp / HEAD_FILE))
        info = {
            "format": EXPERT_FORMAT,
            **inputs,
            "base": str(base),
            "cache_key": key,
            "versions": library_versions(),
            "train_examples": len(splits.train),
            "train_accuracy_last_epoch": accuracy,
            "train_seconds": seconds,
            "device": str(backbone.device),
            "losses": losses,
        }
        (tmp / EXPERT_FILE).write_text(json.dumps(info, indent=1))

    trained = build_once(entry, write)
    return load_expert(entry, trained=trained)


def train_experts(
    suite: Sequence[TaskSplits],
    recipe: TrainRecipe,
    *,
    base: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> list[Expert]:
    """One expert per task of `suite` (see `reprmerge_core.data.load_suite`), in the suite's order.

    The i-th task trains with `recipe.task_seed(i)`.
    """
    return [
        train_expert(splits, recipe, task_index=i, base=base, cache_dir=cache_dir, device=device, progress=progress)
        for i, splits in enumerate(tqdm(suite, desc="experts", unit="task", disable=not progress))
    ]
