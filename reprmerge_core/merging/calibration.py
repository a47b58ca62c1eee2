"""Layer-input Gram matrices of nn.Linear modules, collected with forward hooks (the only I/O of merging).

A batch is a mapping of keyword arguments for `model(**batch)`. When it holds an `attention_mask` (B, T)
and a layer's input is (B, T, n), only the real tokens' rows count; inputs of any other shape (e.g. the
pooler's (B, n) [CLS] rows) count whole. Sums are float64, so Grams of shards add up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from reprmerge_core.backbone import batched

Batch = Mapping[str, Tensor]
DTYPE = torch.float64


class _Done(Exception):
    """Raised from a hook to end a forward pass once every wanted layer has seen its input."""


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def _forward(model: nn.Module, batch: Batch) -> None:
    """One inference forward (eval mode: no dropout) with the batch on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    model(**{key: value.to(device) for key, value in batch.items()})


def _rows(x: Tensor, batch: Batch) -> Tensor:
    """(tokens, n) rows of a layer input, real tokens only."""
    mask = batch.get("attention_mask")
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device).bool()]
    return x.reshape(-1, x.shape[-1])


@torch.inference_mode()
def collect_grams(
    model: nn.Module,
    batches: Iterable[Batch],
    layers: Sequence[str],
    *,
    stop_early: bool = False,
    desc: str | None = None,
) -> dict[str, Tensor]:
    """S = sum over calibration rows of x x^T for each named nn.Linear's input, streaming over `batches`.

    `stop_early` ends each forward once all `layers` have fired: right for sequential merging, where only
    layers up to the current stage matter and the rest of the network would be wasted work.
    Layers reading the same input tensor (query/key/value) share one product. Accumulates on the model's
    device, returns CPU tensors. Puts the model in eval mode.
    """
    modules = linear_layers(model)
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"not nn.Linear modules of the model: {', '.join(missing)}")
    device = next(model.parameters()).device
    grams = {
        name: torch.zeros(modules[name].in_features, modules[name].in_features, dtype=DTYPE, device=device)
        for name in layers
    }
    current: dict[str, Batch] = {}
    last: dict[str, Tensor] = {}  # the previous hook's input and its product, reused when shared
    seen: set[str] = set()

    def hook(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def fn(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if last.get("input") is not args[0]:
                rows = _rows(args[0], current["batch"]).to(DTYPE)
                last["input"], last["gram"] = args[0], rows.T @ rows
            grams[name] += last["gram"]
            seen.add(name)
            if stop_early and len(seen) == len(grams):
                raise _Done

        return fn

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in layers]
    try:
        for batch in tqdm(batches, desc=desc, disable=desc is None, unit="batch", leave=False):
            current["batch"] = batch
            seen.clear()
            last.clear()
            with contextlib.suppress(_Done):
                _forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: gram.cpu() for name, gram in grams.items()}


@torch.inference_mode()
def layer_stages(model: nn.Module, batch: Batch, layers: Sequence[str]) -> list[list[str]]:
    """`layers` in forward order, grouped into stages of layers that read the same input tensor
    (e.g. query/key/value): a stage can be merged at once because its input is shared."""
    modules = linear_layers(model)
    order: list[tuple[str, Tensor]] = []  # holds the inputs alive so identity comparisons stay valid
    handles = [
        modules[name].register_forward_pre_hook(lambda _m, args, name=name: order.append((name, args[0])))
        for name in layers
    ]
    try:
        _forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[str]] = []
    for position, (name, x) in enumerate(order):
        if position and x is order[position - 1][1]:
            stages[-1].append(name)
        else:
            stages.append([name])
    return stages


def text_batches(
    tokenizer: object, texts: Sequence[str], batch_size: int = 32, max_length: int = 128
) -> list[dict[str, Tensor]]:
    """Tokenised batches, texts sorted by length so batches carry little padding (Grams ignore order)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [
        dict(tokenizer(list(chunk), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        for chunk in batched(sorted(texts, key=len), batch_size)
    ]

