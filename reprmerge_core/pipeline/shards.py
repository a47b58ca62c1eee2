"""Calibration beyond one machine: the statistics pass split into shards, and shards added into a bundle.

`calibrate_bundle(..., shard=ShardSpec(I, N))` (`calibrate_shard` here) writes the statistics of shard I
of N (inputs i with i mod N == I) into one safetensors file, and `reduce_shards` adds the shards into a
bundle. The statistics are sums kept per beta fold (fold of input i: i mod folds, as in one pass), so the
reduced bundle equals the unsharded one up to float summation order, beta choice included. A shard records
the plan (settings, heads, label names) and hashes of the backbone, the experts and every task's inputs, so
shards of different calibrations are refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from operator import add
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from reprmerge_core.artifacts import atomic_file
from reprmerge_core.backbone import Backbone
from reprmerge_core.bundle.check import sha256_file
from reprmerge_core.calibration import collect_statistics
from reprmerge_core.correction import TaskHead, TaskStatistics
from reprmerge_core.correction.solver import Normalisation
from reprmerge_core.experts import ExpertSource
from reprmerge_core.merging.diagnostics import ExpertDiagnostics
from reprmerge_core.pipeline.plan import CalibrationPlan, write_calibrated

SHARD_FORMAT = "reprmerge-calibration-shard"
# Manifest fields that differ between the shards of one calibration; every other field must agree.
_PER_SHARD = {"index", "tensors_sha256", "statistics_forward_seconds"}
_CHECKPOINT_SUFFIXES = {".json", ".safetensors", ".txt", ".model"}


class ShardError(ValueError):
    """A shard file that cannot be used, or shards that do not add up to one calibration."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")


@dataclass(frozen=True)
class ShardSpec:
    """Shard `index` of `count`: the calibration inputs i with i mod count == index, of every task."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"a shard is I/N with 0 <= I < N, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        index, sep, count = text.partition("/")
        if not (sep and index.isdigit() and count.isdigit()):
            raise ValueError(f"a shard is I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
        return cls(int(index), int(count))


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardTask(_Frozen):
    name: str
    labels: list[str]
    inputs: int = Field(ge=1, description="calibration inputs of the task over all shards")
    inputs_sha256: str = Field(description="hash of all the task's inputs, in order: shards must split the same data")
    expert: str
    expert_sha256: str


class ShardManifest(_Frozen):
    """Stored in the shard file's safetensors metadata; `tensors_sha256` guards the tensors."""

    format: Literal["reprmerge-calibration-shard"] = SHARD_FORMAT
    format_version: Literal[1] = 1
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    folds: int = Field(ge=2)
    tasks: list[ShardTask] = Field(min_length=1)
    backbone: str
    backbone_sha256: str
    pooling: Literal["mean", "cls", "pooler"]
    max_length: int = Field(ge=1)
    beta: float | Literal["auto"]
    prior: float | Literal["auto", "procrustes", "identity"] = "auto"  # absent in shards written before the prior CV
    normalisation: Normalisation
    merge_method: str
    tensors_sha256: str = ""
    statistics_forward_seconds: float = 0.0
    expert_diagnostics: ExpertDiagnostics | None = None


@dataclass(frozen=True)
class Shard:
    path: Path
    manifest: ShardManifest
    folds: list[list[TaskStatistics]]  # [task][fold]
    heads: list[TaskHead]


def _checkpoint_sha256(path: Path) -> str:
    """Content hash of a checkpoint's weights, config and tokenizer files."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES):
        h.update(f"{file.name}\0{sha256_file(file)}\0".encode())
    return h.hexdigest()


def _tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def calibrate_shard(plan: CalibrationPlan, merged: Backbone, models: Sequence[Backbone], texts: Sequence[Sequence[str]],
                     out: Path, shard: ShardSpec, *, batch_size: int, progress: bool) -> Path:
    """Per-fold statistics of one shard of the inputs, written atomically to the file `out`.

    Every shard is given all inputs and keeps its own, so each can record a hash of the whole data
    set: `reduce_shards` refuses shards that split different data.
    """
    folds = plan.folds
    # One group per (task, fold) this shard has inputs of, each collected as a one-fold "task".
    groups = {(t, f): [x for i, x in enumerate(task) if i % shard.count == shard.index and i % folds == f]
              for t, task in enumerate(texts) for f in range(folds)}
    busy = [g for g, inputs in groups.items() if inputs]
    stats = collect_statistics(merged, [models[t] for t, _ in busy], [groups[g] for g in busy],
                               folds=1, batch_size=batch_size, progress=progress)
    found = {g: task[0].to("cpu") for g, task in zip(busy, stats.folds)}
    # a fold this shard has no inputs of (e.g. when N and folds share a factor) adds zeros
    fold_stats = [[found[t, f] if (t, f) in found else TaskStatistics.zeros(merged.dim) for f in range(folds)]
                  for t in range(len(texts))]
    manifest = ShardManifest(
        index=shard.index, count=shard.count, folds=folds,
        tasks=[ShardTask(name=s.name, labels=s.labels, inputs=len(x), expert=str(s.path),
                         inputs_sha256=hashlib.sha256(json.dumps(x).encode()).hexdigest(),
                         expert_sha256=_checkpoint_sha256(s.path)) for s, x in zip(plan.sources, texts)],
        backbone=str(plan.backbone), backbone_sha256=_checkpoint_sha256(plan.backbone), pooling=plan.pooling,
        max_length=plan.max_length, beta=plan.beta, prior=plan.prior, normalisation=plan.normalisation,
        merge_method=plan.merge_method, statistics_forward_seconds=stats.forward_seconds,
        expert_diagnostics=plan.diagnostics,
    )
    tensors = {"n": torch.tensor([[x.n for x in task] for task in fold_stats], dtype=torch.int64),
               "e": torch.tensor([[x.e for x in task] for task in fold_stats], dtype=torch.float64)}
    for s, task in zip(plan.sources, fold_stats):
        for f, x in enumerate(task):
            tensors[f"A.{s.name}.{f}"], tensors[f"B.{s.name}.{f}"] = x.A.contiguous(), x.B.contiguous()
        tensors[f"weight.{s.name}"], tensors[f"bias.{s.name}"] = s.head.weight.contiguous(), s.head.bias.contiguous()
    manifest = manifest.model_copy(update={"tensors_sha256": _tensors_sha256(tensors)})
    with atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata={"manifest": manifest.model_dump_json()})
    return out


def read_shard(path: str | Path) -> Shard:
    """Load and check one shard file (format, manifest, tensor hash, shapes)."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ShardError(path, f"unreadable safetensors file ({exc})") from exc
    if "manifest" not in meta:
        raise ShardError(path, "not a reprmerge calibration shard (no manifest in its metadata)")
    try:
        manifest = ShardManifest.model_validate_json(meta["manifest"])
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ShardError(path, f"invalid shard manifest at {'.'.join(map(str, err['loc']))}: {err['msg']}") from exc
    if _tensors_sha256(tensors) != manifest.tensors_sha256:
        raise ShardError(path, "sha256 mismatch: the shard is damaged or was modified")
    try:
        folds = [[TaskStatistics(tensors[f"A.{t.name}.{f}"], tensors[f"B.{t.name}.{f}"], int(tensors["n"][i, f]),
                                 float(tensors["e"][i, f])) for f in range(manifest.folds)]
                 for i, t in enumerate(manifest.tasks)]
        heads = [TaskHead(tensors[f"weight.{t.name}"], tensors[f"bias.{t.name}"]) for t in manifest.tasks]
    except (KeyError, IndexError, ValueError) as exc:
        raise ShardError(path, f"tensors do not match the shard manifest ({exc})") from exc
    return Shard(path, manifest, folds, heads)


def _check_complete(shards: Sequence[Shard]) -> list[Shard]:
    """The shards in index order, once they are known to be exactly 0..N-1 of one calibration."""
    first = shards[0]
    common = first.manifest.model_dump(exclude=_PER_SHARD)
    for s in shards[1:]:
        other = s.manifest.model_dump(exclude=_PER_SHARD)
        differs = sorted(k for k in common if common[k] != other[k])
        if differs:
            raise ShardError(s.path, f"is not from the calibration of {first.path} (differs in {', '.join(differs)}); "
                                     "shards must share backbone, experts, tasks, inputs and settings")
    count = first.manifest.count
    by_index: dict[int, Shard] = {}
    for s in shards:
        if s.manifest.index in by_index:
            raise ShardError(s.path,
                             f"duplicate shard {s.manifest.index}/{count}, also in {by_index[s.manifest.index].path}")
        by_index[s.manifest.index] = s
    missing = [f"{i}/{count}" for i in range(count) if i not in by_index]
    if missing:
        raise ValueError(f"missing shards {', '.join(missing)}: got {len(shards)} of {count}")
    return [by_index[i] for i in range(count)]


def reduce_shards(paths: Sequence[str | Path], out: str | Path, *, backbone: str | Path | None = None,
                  overwrite: bool = False) -> Path:
    """Add the shards of one calibration into a bundle; equal to `calibrate_bundle` on all inputs.

    `backbone` replaces the backbone path the shards recorded (e.g. another mount of the same
    checkpoint); its content must hash the same.
    """
    if not paths:
        raise ValueError("no shard files given")
    shards = _check_complete([read_shard(p) for p in paths])
    m = shards[0].manifest
    backbone_dir = Path(backbone or m.backbone)
    if not (backbone_dir / "config.json").is_file():
        raise ValueError(f"backbone {backbone_dir} is not a checkpoint directory; "
                         "pass --backbone with the one the shards used")
    if _checkpoint_sha256(backbone_dir) != m.backbone_sha256:
        raise ValueError(f"backbone {backbone_dir} differs from the one the shards were computed with "
                         "(sha256 mismatch)")
    fold_stats = [[reduce(add, (s.folds[t][f] for s in shards)) for f in range(m.folds)] for t in range(len(m.tasks))]
    plan = CalibrationPlan(
        backbone=backbone_dir, pooling=m.pooling, max_length=m.max_length, beta=m.beta, normalisation=m.normalisation,
        folds=m.folds, merge_method=m.merge_method, diagnostics=m.expert_diagnostics, prior=m.prior,
        sources=[ExpertSource(t.name, Path(t.expert), head, t.labels, m.pooling)
                 for t, head in zip(m.tasks, shards[0].heads)],
    )
    return write_calibrated(plan, fold_stats, out, overwrite=overwrite, extra={"shards": m.count},
                  timings={"statistics_forward": sum(s.manifest.statistics_forward_seconds for s in shards)})
