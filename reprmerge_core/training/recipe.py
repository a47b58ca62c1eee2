"""The expert fine-tuning recipe of data.md, as a validated, hashable config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from reprmerge_core.backbone import Pooling

TASK_SEED_OFFSET = 100
"""Per-task seeds are `seed + TASK_SEED_OFFSET + task index` (the setting issue 10 measured)."""


class TrainRecipe(BaseModel):
    """How one expert is fine-tuned from the backbone.

    The encoder and a fresh linear head train jointly; the embedding block stays frozen so every
    expert keeps the base's token space (task vectors then live in the transformer layers only).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(default=1e-4, gt=0, allow_inf_nan=False)
    batch_size: int = Field(default=32, ge=1)
    epochs: int = Field(default=1, ge=1)
    max_length: int = Field(default=64, ge=2)
    weight_decay: float = Field(default=0.01, ge=0, allow_inf_nan=False)
    warmup_fraction: float = Field(default=0.1, ge=0, le=1)
    pooling: Pooling = "mean"
    freeze_embeddings: bool = True
    seed: int = 0
    # "per_task": every task's head starts from its own random Linear. "shared" (the recipe before issue 10)
    # gives every head the same start, so after one epoch all class directions share one axis and merging
    # adds the experts' pushes along it up (TIES 0.645 mean on text6 vs 0.851 per task).
    seeding: Literal["per_task", "shared"] = "per_task"
    # "balanced": cross-entropy weighted by n / (classes x class count), so a rare class (spam is 12% of
    # sms_spam, ABBR 1.5% of trec6) is not drowned by the frequent ones: the starter experts gave "WIN a free
    # cruise, text now!" p(spam) 0.29 unweighted. Left out of the expert cache key when "none".
    class_weights: Literal["none", "balanced"] = "none"

    def task_seed(self, task_index: int) -> int:
        """The seed of the expert at `task_index` in its suite: head initialisation and batch order."""
        return self.seed if self.seeding == "shared" else self.seed + TASK_SEED_OFFSET + task_index

    def cache_fields(self) -> dict[str, object]:
        """The fields that identify an expert: fields added later are left out at their default, so the
        experts cached before them keep their keys."""
        return self.model_dump(exclude={"class_weights"} if self.class_weights == "none" else None)


RECIPES: dict[str, TrainRecipe] = {
    # One epoch at lr 1e-4, batch 32 is too few steps on 256 examples (sms_spam stays at the majority class).
    "tiny": TrainRecipe(learning_rate=2e-4, batch_size=16, epochs=2, max_length=32),
    # The default model (`make serve`): text6's recipe at twice the learning rate (movie_sentiment 0.836 vs 0.830
    # on 500 test texts) and max length 48 (90% of SMS, 97% of movie snippets, every question fit; ~25% less
    # training time than 64).
    "starter": TrainRecipe(learning_rate=2e-4, batch_size=32, epochs=1, max_length=48, class_weights="balanced"),
    "text6": TrainRecipe(learning_rate=1e-4, batch_size=32, epochs=1, max_length=64),
}
