"""Sequential layer-wise merging: each linear layer's calibration inputs come from the already-merged
layers before it (method.md section 2), so later layers are fitted to the inputs the merged network
will really feed them, not to each expert's own activations.

Targets stay `Delta_k X_k` with X_k the merged network's inputs at that layer, i.e. the same QP / RegMean
with Grams taken on the partially merged model. Parameters outside linear layers are merged first with
the method's data-free rule, as they shape the inputs of later layers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from reprmerge_core.merging.calibration import Batch, collect_grams, layer_stages, linear_layers
from reprmerge_core.merging.merge import (
    METHODS,
    MergeReport,
    MergeResult,
    StateDict,
    changed_parameters,
    check_state_dicts,
    iter_merged,
    resolve,
    resolve_weights,
)
from reprmerge_core.merging.params import MergeParams


def merge_sequential(
    model: nn.Module,
    base: StateDict,
    experts: Mapping[str, StateDict],
    method: str,
    params: Mapping[str, Any] | MergeParams | None,
    batches: Mapping[str, Sequence[Batch]],
    *,
    progress: bool = False,
) -> MergeResult:
    """Merge into `model` (the base architecture; its weights are overwritten and end merged), stage by
    stage in forward order. `batches[task]` are `model(**batch)` inputs of each task's calibration data.
    Linear layers that share one input tensor (query/key/value) form one stage."""
    spec, checked = resolve(method, params)
    if not spec.data_aware:
        raise ValueError(
            f"method {method!r} uses no calibration data; sequential merging applies to "
            f"{', '.join(name for name, m in METHODS.items() if m.data_aware)}"
        )
    check_state_dicts(base, experts)
    if set(batches) != set(experts) or not all(batches[task] for task in experts):
        raise ValueError(f"calibration batches are needed for every expert {sorted(experts)}, got {sorted(batches)}")
    base = {name: tensor.clone() for name, tensor in base.items()}  # it may share storage with `model`
    report = MergeReport.start(method, checked, experts, resolve_weights(method, None, list(experts)))
    names = changed_parameters(base, experts, checked.freeze)
    candidates = [layer for layer in linear_layers(model) if f"{layer}.weight" in names]
    state = dict(base)
    model.load_state_dict(state)
    stages = layer_stages(model, batches[next(iter(experts))][0], candidates) if candidates else []
    staged = {f"{layer}.weight" for stage in stages for layer in stage}  # layers that never run stay data-free
    state.update(iter_merged(base, experts, spec, checked, [n for n in names if n not in staged], None, report))
    model.load_state_dict(state)
    spent = {"calibration": 0.0, "merge": 0.0}
    for stage in tqdm(stages, desc="sequential merge", unit="stage", disable=not progress):
        start = time.perf_counter()
        grams = {task: collect_grams(model, batches[task], stage, stop_early=True) for task in experts}
        spent["calibration"] += time.perf_counter() - start
        start = time.perf_counter()
        weights = [f"{layer}.weight" for layer in stage]
        merged = dict(iter_merged(base, experts, spec, checked, weights, grams, report))
        with torch.no_grad():
            for name, tensor in merged.items():
                model.get_parameter(name).copy_(tensor)
        state.update(merged)
        spent["merge"] += time.perf_counter() - start
    report.timings.update(spent)
    report.finish(base)
    return MergeResult(state, report)
