"""`reprmerge calibrate`: a bundle from a user's own merged backbone, expert checkpoints and inputs.

An expert is a transformers checkpoint whose task head is either
- a `head.safetensors` beside it (`weight` (classes, d), `bias` (classes,)), label names from its
  `expert.json` "labels" or the config's id2label; representations use `pooling` (default mean), or
- its own sequence-classification layer (`classifier`, an nn.Linear, as in BertForSequenceClassification),
  read with the representation that layer reads: the model's pooler output where it has one, else [CLS].
Everything is checked before any forward pass: architecture, representation size, vocabulary, heads,
and that calibration inputs are given for exactly the experts.

Beyond one machine: `calibrate_bundle(..., shard=ShardSpec(I, N))` writes the statistics of shard I
of N (inputs i with i mod N == I) into one safetensors file, and `reduce_shards` adds the shards into
a bundle. The statistics are sums kept per beta fold (fold of input i: i mod folds, as in one pass),
so the reduced bundle equals the unsharded one up to float summation order, beta choice included.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
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
from transformers import AutoConfig, AutoModelForSequenceClassification

from reprmerge_core.artifacts import check_output
from reprmerge_core.backbone import Backbone, Pooling, quiet_transformers, select_device
from reprmerge_core.bundle import write_bundle
from reprmerge_core.bundle.check import sha256_file
from reprmerge_core.bundle.manifest import BackboneInfo, MergeInfo, TaskInfo
from reprmerge_core.calibration import choose_correction, collect_statistics, head_agreement, prior_identity_weight
from reprmerge_core.calibration.collect import warn_few_inputs
from reprmerge_core.correction import TaskHead, TaskStatistics
from reprmerge_core.correction.solver import Normalisation
from reprmerge_core.merging.checkpoints import check_experts, compatibility_problems, distances_from_base
from reprmerge_core.merging.diagnostics import ExpertDiagnostics

HEAD_FILE = "head.safetensors"


@dataclass(frozen=True)
class ExpertSource:
    """How one expert's representation and head are read."""

    name: str
    path: Path
    head: TaskHead
    labels: list[str]
    pooling: Pooling


def _label_names(path: Path, classes: int) -> list[str]:
    info = path / "expert.json"
    recorded = json.loads(info.read_text()).get("labels") if info.is_file() else None
    if isinstance(recorded, list):
        labels = [str(x) for x in recorded]
    else:
        id2label = AutoConfig.from_pretrained(path, local_files_only=True).id2label or {}
        # a config's id2label names this head only when it has one entry per class
        labels = [str(id2label[i]) for i in range(classes)] if set(id2label) == set(range(classes)) else [str(i) for i in range(classes)]
    if len(labels) != classes:
        raise ValueError(f"expert {path}: {len(labels)} label names for a head with {classes} classes")
    return labels if len(set(labels)) == classes else [str(i) for i in range(classes)]


def has_head(path: Path) -> bool:
    """Whether the checkpoint at `path` carries a task head that `read_expert` reads."""
    if (path / HEAD_FILE).is_file():
        return True
    if not (path / "config.json").is_file():
        return False
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def read_expert(name: str, path: str | Path, pooling: Pooling) -> ExpertSource:
    """The head and representation of one expert checkpoint (see the module docstring)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"expert {name!r}: {path} is not a transformers checkpoint (no config.json)")
    if (path / HEAD_FILE).is_file():
        tensors = load_file(str(path / HEAD_FILE))
        if set(tensors) != {"weight", "bias"}:
            raise ValueError(f"expert {name!r}: {HEAD_FILE} must hold exactly 'weight' and 'bias', has {sorted(tensors)}")
        head = TaskHead(tensors["weight"].float(), tensors["bias"].float())
        return ExpertSource(name, path, head, _label_names(path, head.num_classes), pooling)
    if not has_head(path):
        raise ValueError(f"expert {name!r}: {path} has neither {HEAD_FILE} nor a sequence-classification head")
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, torch.nn.Linear):
        raise ValueError(f"expert {name!r}: its classification head is not a single linear layer; "
                         f"export it as {HEAD_FILE} with the representation it reads")
    has_pooler = getattr(model.base_model, "pooler", None) is not None
    head = TaskHead(classifier.weight.detach().float().clone(), classifier.bias.detach().float().clone())
    return ExpertSource(name, path, head, _label_names(path, head.num_classes), "pooler" if has_pooler else "cls")


@dataclass(frozen=True)
class CalibrationPlan:
    """Everything a bundle needs besides statistics; shards record it so `reduce_shards` can finish the bundle."""

    backbone: Path
    sources: list[ExpertSource]
    pooling: Pooling
    max_length: int
    beta: float | str
    normalisation: Normalisation
    folds: int
    merge_method: str
    diagnostics: ExpertDiagnostics | None = None
    prior: float | str = "auto"


def _plan(
    backbone: Path, experts: Mapping[str, str | Path], calibration: Mapping[str, Sequence[str]], *, pooling: Pooling,
    max_length: int, beta: float | str, normalisation: Normalisation, folds: int, merge_method: str,
    base: Path | None = None, prior: float | str = "auto",
) -> CalibrationPlan:
    """Every check that needs no forward pass (see the module docstring), and the experts' diagnostics.

    Head alignment is always measured; distances from the base only when `base` is given.
    """
    if not experts:
        raise ValueError("at least one --expert is needed")
    if prior != "auto":
        prior_identity_weight(prior)
    if set(calibration) != set(experts):
        raise ValueError(f"calibration inputs are needed for exactly the experts {sorted(experts)}; "
                         f"got {sorted(calibration)}")
    for name, texts in calibration.items():
        if len(texts) < folds:
            raise ValueError(f"calibration for {name!r} has {len(texts)} inputs; at least {folds} are needed")
    paths = {n: Path(p) for n, p in experts.items()}
    problems = compatibility_problems(backbone, paths)
    if base is not None:
        problems += [f"base: {p}" for p in compatibility_problems(base, paths)]
    if problems:
        raise ValueError("experts do not match the backbone:\n  " + "\n  ".join(problems))
    sources = [read_expert(name, path, pooling) for name, path in experts.items()]
    warn_few_inputs({name: len(texts) for name, texts in calibration.items()}, sources[0].head.weight.shape[1])
    poolings = {s.pooling for s in sources}
    if len(poolings) != 1:
        raise ValueError(f"experts read different representations ({sorted(poolings)}); one bundle needs one pooling")
    diagnostics = check_experts({s.name: s.head.weight for s in sources},
                                None if base is None else distances_from_base(base, paths))
    return CalibrationPlan(backbone, sources, poolings.pop(), max_length, beta, normalisation, folds, merge_method,
                           diagnostics, prior)


def _load_models(plan: CalibrationPlan, device: str) -> tuple[Backbone, list[Backbone]]:
    dev = select_device(device)
    merged = Backbone.from_pretrained(plan.backbone, pooling=plan.pooling, max_length=plan.max_length, device=dev)
    for s in plan.sources:
        if s.head.weight.shape[1] != merged.dim:
            raise ValueError(f"expert {s.name!r}: head input size {s.head.weight.shape[1]} != representation size {merged.dim}")
    models = [Backbone.from_pretrained(s.path, pooling=plan.pooling, max_length=plan.max_length, device=dev) for s in plan.sources]
    return merged, models


def _write(plan: CalibrationPlan, fold_stats: Sequence[Sequence[TaskStatistics]], out: str | Path, *,
           timings: Mapping[str, float], extra: Mapping[str, object], overwrite: bool) -> Path:
    """Choose beta on the per-fold statistics and write the bundle (one path for one pass and for reduced shards)."""
    start = time.perf_counter()
    folds = [[x.to("cpu") for x in task] for task in fold_stats]
    correction = choose_correction(folds, plan.beta, plan.normalisation, plan.prior)
    totals = [reduce(add, task) for task in folds]
    return write_bundle(
        out,
        tasks=[TaskInfo(name=s.name, labels=s.labels, calibration_samples=x.n) for s, x in zip(plan.sources, totals)],
        statistics=totals,
        heads=[s.head for s in plan.sources],
        backbone_dir=plan.backbone,
        correction=correction,
        merge=MergeInfo(method=plan.merge_method),
        backbone=BackboneInfo(source=str(plan.backbone), pooling=plan.pooling, max_length=plan.max_length),
        extra={"timings": {**timings, "beta_selection": time.perf_counter() - start}, **extra,
               "experts": {s.name: str(s.path) for s in plan.sources}},
        expert_diagnostics=plan.diagnostics,
        overwrite=overwrite,
    )


def calibrate_bundle(
    backbone: str | Path,
    experts: Mapping[str, str | Path],
    calibration: Mapping[str, Sequence[str]],
    out: str | Path,
    *,
    shard: ShardSpec | None = None,
    pooling: Pooling = "mean",
    max_length: int = 128,
    beta: float | str = "auto",
    prior: float | str = "auto",
    normalisation: Normalisation = Normalisation.ENERGY,
    folds: int = 5,
    merge_method: str = "unknown",
    device: str = "auto",
    batch_size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
    base: str | Path | None = None,
) -> Path:
    """Statistics of `backbone` (already merged) against each expert on its task's inputs, as a bundle.

    With `shard`, only that shard's inputs are used and `out` is a shard file for `reduce_shards`.
    `base` (the checkpoint the experts were fine-tuned from) adds each expert's distance from it to the
    diagnostics recorded in the bundle.
    """
    inputs = {"backbone": backbone, **{f"expert {name!r}": path for name, path in experts.items()},
              **({} if base is None else {"base": base})}
    check_output(out, inputs, overwrite=overwrite)
    plan = _plan(Path(backbone), experts, calibration, pooling=pooling, max_length=max_length, beta=beta,
                 normalisation=normalisation, folds=folds, merge_method=merge_method,
                 base=None if base is None else Path(base), prior=prior)
    merged, models = _load_models(plan, device)
    texts = [list(calibration[s.name]) for s in plan.sources]
    if shard is not None:
        return _calibrate_shard(plan, merged, models, texts, Path(out), shard, batch_size=batch_size, progress=progress)
    stats = collect_statistics(merged, models, texts, folds=folds, batch_size=batch_size, progress=progress,
                               heads=[s.head for s in plan.sources])
    return _write(plan, stats.folds, out, overwrite=overwrite,
                  timings={"statistics_forward": stats.forward_seconds, "statistics_accumulate": stats.accumulate_seconds},
                  extra={"statistics_per_task_seconds": stats.task_seconds,
                         "head_agreement": head_agreement([s.name for s in plan.sources], stats.agreement)})


# -- shards ----------------------------------------------------------------------------------------
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


def _calibrate_shard(plan: CalibrationPlan, merged: Backbone, models: Sequence[Backbone], texts: Sequence[Sequence[str]],
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
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"manifest": manifest.model_dump_json()})
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
            raise ShardError(s.path, f"duplicate shard {s.manifest.index}/{count}, also in {by_index[s.manifest.index].path}")
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
        raise ValueError(f"backbone {backbone_dir} is not a checkpoint directory; pass --backbone with the one the shards used")
    if _checkpoint_sha256(backbone_dir) != m.backbone_sha256:
        raise ValueError(f"backbone {backbone_dir} differs from the one the shards were computed with (sha256 mismatch)")
    fold_stats = [[reduce(add, (s.folds[t][f] for s in shards)) for f in range(m.folds)] for t in range(len(m.tasks))]
    plan = CalibrationPlan(
        backbone=backbone_dir, pooling=m.pooling, max_length=m.max_length, beta=m.beta, normalisation=m.normalisation,
        folds=m.folds, merge_method=m.merge_method, diagnostics=m.expert_diagnostics, prior=m.prior,
        sources=[ExpertSource(t.name, Path(t.expert), head, t.labels, m.pooling) for t, head in zip(m.tasks, shards[0].heads)],
    )
    return _write(plan, fold_stats, out, overwrite=overwrite, extra={"shards": m.count},
                  timings={"statistics_forward": sum(s.manifest.statistics_forward_seconds for s in shards)})
