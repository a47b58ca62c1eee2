"""Merge task experts into one backbone.

Methods (registry `METHODS`; parameters validated by the pydantic models in `params`). A data-free method is a
sparsifier applied to each task vector, per-expert weights, a consensus rule and a global lam (mergekit's
generalized task arithmetic; PEFT's semantics, see `arithmetic`):
- `task_arithmetic` (lam): no sparsifier, linear sum. `ties` (density = kept fraction, lam): magnitude top-k,
  TIES sign election. `dare` (drop_rate, lam, combine linear|ties, seed): DARE random drop.
  `breadcrumbs` (density, gamma, lam, combine linear|ties): drop the largest and the smallest entries.
- per-expert weights (default 1; `weights=` of `merge_state_dicts` / `merge_checkpoints`, `--weight` on the
  command line) scale each task vector: the paper's preference-weighted task arithmetic is
  `task_arithmetic` with lam = 1 and weights = the preference.
- `regmean` (alpha, ridge) and `projection` (basis diagonal|eigen, rank, ridge): data-aware, per linear
  layer from the input Grams of each task's calibration inputs (see `projection`); `sequential=true`
  takes those Grams on the partially merged network (see `sequential`).

Which rule a parameter gets:
- `name.weight` of an nn.Linear with calibration Grams: the data-aware method's linear rule.
- every other parameter (biases, LayerNorm, embeddings, linear weights without Grams): the data-free
  methods apply themselves (TIES trims and elects signs on a LayerNorm weight too); the data-aware
  methods use task arithmetic with their `lam`, by default 1/K, i.e. the experts' average (as RegMean).
- parameters that no expert changed (the project's experts train with frozen embeddings) and those
  matching a `freeze` pattern are the base's tensors, bit-exact, whatever the method.
`merge_checkpoints` streams: it reads base and experts one tensor at a time from their safetensors files and
writes each merged tensor as it is produced (`stream`), so a data-free merge never holds K + 1 models.
All arithmetic is float64 on the task vectors tau_k = theta_k - theta_0; results are cast to the base's
dtype, so lam = 0 returns the base and one expert with lam = 1 returns that expert exactly (a float64
difference of two float32 values is exact unless their magnitudes differ by more than 2^29).
"""

from reprmerge_core.merging.calibration import collect_grams, layer_stages, text_batches
from reprmerge_core.merging.checkpoints import REPORT_FILE, merge_checkpoints
from reprmerge_core.merging.merge import (
    METHODS,
    LayerDiagnostics,
    MergeReport,
    MergeResult,
    diagnose,
    iter_merge,
    merge_state_dicts,
    overall_rho,
    resolve,
    resolve_weights,
)
from reprmerge_core.merging.sequential import merge_sequential

__all__ = [
    "METHODS",
    "REPORT_FILE",
    "LayerDiagnostics",
    "MergeReport",
    "MergeResult",
    "collect_grams",
    "diagnose",
    "iter_merge",
    "layer_stages",
    "merge_checkpoints",
    "merge_sequential",
    "merge_state_dicts",
    "overall_rho",
    "resolve",
    "resolve_weights",
    "text_batches",
]
