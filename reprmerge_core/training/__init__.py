"""Fine-tuning task experts from the backbone (data.md recipe), cached by a hash of their inputs."""

from reprmerge_core.training.cache import CACHE_ENV, cache_root
from reprmerge_core.training.evaluate import HeadEvaluation, evaluate_head
from reprmerge_core.training.expert import Expert, load_expert, train_expert, train_experts
from reprmerge_core.training.recipe import RECIPES, TrainRecipe

__all__ = [
    "CACHE_ENV",
    "RECIPES",
    "Expert",
    "HeadEvaluation",
    "TrainRecipe",
    "cache_root",
    "evaluate_head",
    "load_expert",
    "train_expert",
    "train_experts",
]
