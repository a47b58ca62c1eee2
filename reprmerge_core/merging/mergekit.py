"""A mergekit YAML's merge, mapped onto reprmerge's methods where the two compute the same thing.

mergekit's generalized task arithmetic (mergekit/merge_methods/generalized_task_arithmetic.py) merges
tau_k = theta_k - theta_0 per tensor as: sparsify each tau_k (`density`), weight it (`weight`, per model),
combine (a plain sum, or TIES' sign consensus summing the agreeing entries), divide by the summed weights
when `normalize`, scale by `lambda`. reprmerge's methods (`merging.arithmetic`) are the same steps with
a disjoint *mean* for TIES. So, with every model's weight w equal:

| mergekit                                     | reprmerge                                           |
| `task_arithmetic` (normalize false, default) | task_arithmetic, lam = lambda * w                   |
| `task_arithmetic`, normalize true            | task_arithmetic, lam = lambda / K                   |
| `ties` (normalize true, default)             | ties, density, lam = lambda (the mean over agreeing)|
| `dare_linear` (rescale true, default)        | dare combine=linear, drop_rate = 1 - density, lam as task_arithmetic |
| `dare_ties` with normalize true              | dare combine=ties, drop_rate = 1 - density, lam = lambda |
| `linear` (normalize true, default)           | task_arithmetic, lam = w / (summed weights, the base's too if listed) |

Unequal weights map for the methods without sign consensus (`task_arithmetic`, `dare_linear`, `linear`):
they become reprmerge's per-expert weights, with w = 1 above (normalize divides lam by the summed weights).
Refused, naming the field: other methods (slerp, della, breadcrumbs, model_stock, ...), `ties` or
`dare_ties` summing the agreeing entries (normalize false: reprmerge averages them), unequal weights with
`ties`/`dare_ties` (mergekit elects signs on the weighted vectors, reprmerge as PEFT on the unweighted ones),
`rescale: false`,
densities that differ between models (reprmerge's density is one number), gradients (lists) as values,
and keys that change what is merged (slices, tokenizer sources, a dtype other than float32).
Random masks (DARE) are drawn by reprmerge's seeded generator, so they differ from mergekit's draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAPPED_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "linear")
# mergekit's `normalize` default per method (its method registry)
_NORMALIZE_DEFAULT = {"task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": False, "linear": True}
_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "name"}
_GLOBAL_KEYS = {"lambda", "normalize", "int8_mask", "rescale", "density", "weight"}
_MODEL_KEYS = {"weight", "density"}


class MergekitError(ValueError):
    """A mergekit setting reprmerge cannot reproduce; `field` is its YAML path (e.g. `models[1].parameters.density`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class MergekitMerge:
    """A mergekit merge in reprmerge's terms; `base` and `models` are the YAML's strings as written."""

    method: str
    params: dict[str, Any]
    base: str
    models: list[str]
    notes: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)  # per model (as written), when they differ


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        kind = "a gradient (list)" if isinstance(value, list) else repr(value)
        raise MergekitError(where, f"must be one finite number for every tensor, got {kind}")
    return float(value)


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MergekitError(where, f"must be a mapping, got {type(value).__name__}")
    return value


def _unknown(keys: Sequence[str], allowed: set[str], where: str, what: str) -> None:
    extra = [k for k in keys if k not in allowed]
    if extra:
        raise MergekitError(f"{where}{extra[0]}" if where else extra[0],
                            f"{what} {extra[0]!r} has no reprmerge equivalent; supported: {', '.join(sorted(allowed))}")


def _per_model(models: Sequence[tuple[int, Mapping[str, Any]]], globals_: Mapping[str, Any], key: str,
               default: float | None) -> list[tuple[str, float]]:
    """Each model's `key` (its own, else the global one, else `default`) with the YAML path it came from."""
    values = []
    for i, model in models:
        params = _mapping(model.get("parameters"), f"models[{i}].parameters")
        if key in params:
            values.append((f"models[{i}].parameters.{key}", _number(params[key], f"models[{i}].parameters.{key}")))
        elif key in globals_:
            values.append((f"parameters.{key}", _number(globals_[key], f"parameters.{key}")))
        elif default is None:
            raise MergekitError(f"models[{i}].parameters.{key}", "required by mergekit for this method")
        else:
            values.append((f"models[{i}].parameters.{key}", default))
    return values


def _one(values: Sequence[tuple[str, float]], why: str) -> float:
    """The one value every model shares, or an error naming the first model whose value differs."""
    first = values[0][1]
    for where, value in values:
        if value != first:
            raise MergekitError(where, f"{value:g} differs from {values[0][0]} ({first:g}); {why}")
    return first


def map_mergekit(config: Mapping[str, Any]) -> MergekitMerge:
    """reprmerge's method and parameters for a parsed mergekit YAML, or `MergekitError` naming the first field
    that does not map (see the module docstring)."""
    if not isinstance(config, Mapping):
        raise MergekitError("(top)", "a mergekit configuration is a mapping with merge_method, base_model and models")
    _unknown(list(config), _TOP_KEYS, "", "key")
    method = config.get("merge_method")
    if method not in MAPPED_METHODS:
        raise MergekitError("merge_method", f"{method!r} does not map onto a reprmerge method; mapped: "
                                            f"{', '.join(MAPPED_METHODS)}")
    dtype = config.get("dtype", "float32")
    if dtype != "float32":
        raise MergekitError("dtype", f"{dtype!r}: reprmerge merges in float64 and keeps the base's dtype; "
                                     "use float32 or leave it out")
    models = config.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, Mapping) for m in models):
        raise MergekitError("models", "must be a non-empty list of {model: PATH, parameters: {...}}")
    for i, model in enumerate(models):
        _unknown(list(model), {"model", "parameters"}, f"models[{i}].", "key")
        if not isinstance(model.get("model"), str):
            raise MergekitError(f"models[{i}].model", "must be a path")
        _unknown(list(_mapping(model.get("parameters"), f"models[{i}].parameters")), _MODEL_KEYS,
                 f"models[{i}].parameters.", "parameter")
    globals_ = _mapping(config.get("parameters"), "parameters")
    _unknown(list(globals_), _GLOBAL_KEYS, "parameters.", "parameter")
    base = config.get("base_model")
    paths = [m["model"] for m in models]
    base_listed = base in paths
    experts = [(i, m) for i, m in enumerate(models) if m["model"] != base]
    if not isinstance(base, str):
        raise MergekitError("base_model", "reprmerge merges task vectors from a base: give base_model")
    if not experts:
        raise MergekitError("models", "lists only the base model")

    lam = _number(globals_.get("lambda", 1.0), "parameters.lambda")
    normalize = globals_.get("normalize", _NORMALIZE_DEFAULT[method])
    if not isinstance(normalize, bool):
        raise MergekitError("parameters.normalize", f"must be true or false, got {normalize!r}")
    if globals_.get("rescale", True) is not True:
        raise MergekitError("parameters.rescale", "false (DARE without rescaling) has no reprmerge equivalent")
    weights = _per_model(experts, globals_, "weight", None if method != "linear" else 1.0)
    K, names = len(experts), [m["model"] for _, m in experts]
    per_expert: dict[str, float] = {}
    if method in ("ties", "dare_ties") or len({v for _, v in weights}) == 1:
        w = _one(weights, "with sign consensus mergekit elects signs on the weighted vectors, reprmerge on the "
                          "unweighted ones (as PEFT): give every model one weight")
    else:  # a weighted sum: the weights go to the merge as they are, lam carries the rest
        w, per_expert = 1.0, {name: v for name, (_, v) in zip(names, weights, strict=True)}
    shown = ", ".join(f"{v:g}" for v in per_expert.values()) if per_expert else f"{w:g}"
    notes = [f"mergekit {method} mapped with weight {shown}, lambda {lam:g}, normalize {str(normalize).lower()}"]
    if method == "linear":
        total = sum(v for _, v in _per_model(list(enumerate(models)), globals_, "weight", 1.0))
        if not normalize and not math.isclose(total, 1.0):
            raise MergekitError("parameters.normalize", f"false with weights summing to {total:g}: the result is "
                                                        "not the base plus task vectors")
        return MergekitMerge("task_arithmetic", {"lam": w / total if normalize else w}, base, names,
                             [*notes, f"base listed among models: {base_listed}"], per_expert)
    if method in ("task_arithmetic", "dare_linear"):
        summed = sum(v for _, v in weights)
        scale = (lam / K if not per_expert else lam / summed) if normalize else lam * w
        params: dict[str, Any] = {"lam": scale}
    else:  # ties, dare_ties: sign consensus
        if not normalize:
            raise MergekitError("parameters.normalize", f"false ({method}'s default in mergekit) sums the agreeing "
                                                        "entries; reprmerge averages them: set normalize: true")
        params = {"lam": lam}
    if method != "task_arithmetic":
        densities = _per_model(experts, globals_, "density", 1.0)
        density = _one(densities, "reprmerge's density is one number for every expert")
        if method == "ties":
            params["density"] = density
        else:
            if not 0 < density <= 1:
                raise MergekitError(densities[0][0], f"must be in (0, 1], got {density:g}")
            params.update(drop_rate=1.0 - density, combine="linear" if method == "dare_linear" else "ties")
    return MergekitMerge("dare" if method.startswith("dare") else method, params, base, names, notes, per_expert)
