"""The expert fine-tuning recipe of data.md, as a validated, hashable config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from reprmerge_core.backbone import Pooling


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


RECIPES: dict[str, TrainRecipe] = {
    # One epoch at lr 1e-4, batch 32 is too few steps on 256 examples (sms_spam stays at the majority class).
    "tiny": TrainRecipe(learning_rate=2e-4, batch_size=16, epochs=2, max_length=32),
    "text6": TrainRecipe(learning_rate=1e-4, batch_size=32, epochs=1, max_length=64),
}
