"""Merge transformers checkpoint directories: compatibility checks, calibration, merge, save."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from reprmerge_core.artifacts import atomic_dir, check_output
from reprmerge_core.backbone import quiet_transformers
from reprmerge_core.checks import check_task_names, checkpoint_dir
from reprmerge_core.merging.calibration import Batch, collect_grams, text_batches
from reprmerge_core.merging.diagnostics import ExpertDiagnostics, diagnose_experts, task_vector_norm
from reprmerge_core.merging.merge import (
    MergeReport,
    MergeResult,
    changed_parameters,
    iter_merge,
    resolve,
    resolve_weights,
    state_dict_problems,
)
from reprmerge_core.merging.params import DataAwareParams, MergeParams
from reprmerge_core.merging.sequential import merge_sequential
from reprmerge_core.merging.stream import (
    DTYPES,
    WEIGHTS_FILE,
    EncoderLayout,
    LazyCheckpoint,
    encoder_layout,
    layout_problems,
    write_checkpoint,
)

REPORT_FILE = "merge_report.json"
# Config fields that change what the encoder computes; heads' label maps, dropout and bookkeeping may differ.
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "hidden_act",
    "layer_norm_eps",
    "position_embedding_type",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
logger = logging.getLogger(__name__)


def checked_inputs(base_dir: str | Path, expert_dirs: Mapping[str, str | Path]) -> tuple[Path, dict[str, Path]]:
    """The base and the experts as checkpoint directories, before any loading: task names by the one rule,
    paths that exist and hold safetensors weights (`reprmerge_core.checks`), each error naming its input."""
    check_task_names(expert_dirs, "expert")
    return (checkpoint_dir(base_dir, "base"),
            {task: checkpoint_dir(path, f"expert {task!r}") for task, path in expert_dirs.items()})


def _load_encoder(path: Path) -> PreTrainedModel:
    path = checkpoint_dir(path, "checkpoint")
    with quiet_transformers():
        return AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)


def _vocab(path: Path) -> dict[str, int] | None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(path, local_files_only=True).get_vocab()


def compatibility_problems(base_dir: Path, expert_dirs: Mapping[str, Path]) -> list[str]:
    """What keeps the experts from being merged into the base: architecture config fields and tokenizer
    vocabularies (experts without tokenizer files are not checked for it). Cheap: no weights are read."""
    problems = []
    base_config = AutoConfig.from_pretrained(base_dir, local_files_only=True).to_dict()
    base_vocab = _vocab(base_dir)
    for task, path in expert_dirs.items():
        config = AutoConfig.from_pretrained(path, local_files_only=True).to_dict()
        problems += [
            f"config {field}: base {base_config.get(field)!r} vs expert {task!r} {config.get(field)!r}"
            for field in ARCHITECTURE_FIELDS
            if base_config.get(field) != config.get(field)
        ]
        vocab = _vocab(path)
        if base_vocab is not None and vocab is not None and vocab != base_vocab:
            differing = sorted(set(vocab.items()) ^ set(base_vocab.items()))[:3]
            problems.append(
                f"tokenizer vocab of expert {task!r} differs from the base ({len(vocab)} vs "
                f"{len(base_vocab)} tokens; e.g. {', '.join(repr(token) for token, _ in differing)})"
            )
    return problems


def check_experts(heads: Mapping[str, Tensor], norms: Mapping[str, float] | None, *,
                  force: bool = False) -> ExpertDiagnostics:
    """`diagnose_experts`, with each finding logged as a warning so a user sees it before trusting the merge.

    An expert farther from the base than the diagnostics' threshold (in multiples of its peers' median
    distance) was almost surely not fine-tuned from this base and would swamp the others: it is refused
    (ValueError naming it and the figures) unless `force`, and then only warned about.
    """
    diagnostics = diagnose_experts(heads, norms)
    far = {t: r for t, r in diagnostics.norm_ratios.items() if r > diagnostics.norm_ratio_threshold}
    if far and norms is not None and not force:
        listed = "; ".join(f"expert {t!r} is {r:.1f}x as far from the base as the median of its peers "
                           f"(task-vector norm {norms[t]:.3g})" for t, r in far.items())
        raise ValueError(
            f"{listed}. All norms: {', '.join(f'{t} {v:.3g}' for t, v in norms.items())}; refused above "
            f"{diagnostics.norm_ratio_threshold:g}x. Such an expert was most likely not fine-tuned from this base "
            "and would swamp the others; pass --force (a recipe's force: true) to use it anyway."
        )
    for message in diagnostics.warnings:
        logger.warning(message)
    return diagnostics


def distances_from_base(base_dir: Path, expert_dirs: Mapping[str, Path]) -> dict[str, float]:
    """Each expert's task-vector norm from the base checkpoint, reading one tensor at a time."""
    layout = encoder_layout(base_dir)
    base = LazyCheckpoint(base_dir, layout)
    return {task: task_vector_norm(base, LazyCheckpoint(path, layout)) for task, path in expert_dirs.items()}


def read_merge_report(checkpoint: str | Path) -> MergeReport | None:
    """The merge report `merge_checkpoints` wrote next to a merged checkpoint, or None when there is none
    (a backbone merged by other tools)."""
    path = Path(checkpoint) / REPORT_FILE
    if not path.is_file():
        return None
    try:
        return MergeReport.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not a valid merge report: {exc}") from None


def check_merge_output(out_dir: str | Path, base_dir: str | Path, expert_dirs: Mapping[str, str | Path], *,
                       overwrite: bool) -> None:
    """Refuse an output that exists (unless `overwrite`) or overlaps the base or an expert (always)."""
    check_output(out_dir, {"base": base_dir, **{f"expert {task!r}": path for task, path in expert_dirs.items()}},
                 overwrite=overwrite)


def _grams_one_expert_at_a_time(
    paths: Mapping[str, Path], batches: Mapping[str, Sequence[Batch]], layers: Sequence[str], progress: bool
) -> dict[str, dict[str, Tensor]]:
    """Each expert's input Grams from its own forward passes, loading one expert model at a time."""
    grams = {}
    for task, path in paths.items():
        model = _load_encoder(path)
        grams[task] = collect_grams(model, batches[task], layers, desc=f"calibration {task}" if progress else None)
        del model
    return grams


def _write(out_dir: str | Path, layout: EncoderLayout, base: LazyCheckpoint, tensors: Iterable[tuple[str, Tensor]],
           tokenizer: PreTrainedTokenizerBase, report: MergeReport, *, timing: str) -> None:
    """The merged checkpoint, atomically: safetensors streamed from `tensors` (cast to the base's stored
    dtypes; their consumption timed as `report.timings[timing]`), the base's config and tokenizer, and the
    report (complete once `tensors` is exhausted)."""
    entries = {name: (base.dtype_name(name), layout.shapes[name]) for name in base}
    config = copy.deepcopy(layout.config)
    config.architectures = [layout.model_class]
    with atomic_dir(out_dir) as out:
        start = time.perf_counter()
        write_checkpoint(out / WEIGHTS_FILE, entries,
                         ((name, tensor.to(DTYPES[entries[name][0]])) for name, tensor in tensors))
        report.timings[timing] = time.perf_counter() - start
        config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / REPORT_FILE).write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")


def merge_checkpoints(
    base_dir: str | Path,
    expert_dirs: Mapping[str, str | Path],
    method: str,
    params: Mapping[str, Any] | MergeParams | None = None,
    calibration_texts: Mapping[str, Sequence[str]] | None = None,
    out_dir: str | Path | None = None,
    *,
    batch_size: int = 32,
    max_length: int = 128,
    progress: bool = False,
    heads: Mapping[str, Tensor] | None = None,
    overwrite: bool = False,
    weights: Mapping[str, float] | None = None,
    force: bool = False,
) -> MergeResult:
    """Merge expert encoders (the `AutoModel` part; a classification head in an expert directory is ignored)
    into the base, reading every checkpoint's safetensors one tensor at a time (`stream`).

    `weights[task]` scales expert `task`'s task vector (default 1; data-free methods). `calibration_texts[task]`
    are unlabeled inputs of each expert's task: required by data-aware methods (their Grams come from one
    expert model loaded at a time; `sequential=true` loads all, as it runs the partially merged network), and
    with any method they add per-layer rho to the report. With `out_dir`, the merged tensors are written as
    they are produced (safetensors + the base's config and tokenizer) with merge_report.json, atomically, and
    `state_dict` reads them back lazily; without, `state_dict` holds them. An existing `out_dir` is replaced
    only with `overwrite`, and one that is, holds or sits inside the base or an expert is refused (both
    before any loading). Incompatible checkpoints, bad parameters and bad weights are refused before any
    weights are merged. Before merging, the experts' distances from the base and the alignment of their
    `heads` (task -> head weight (classes, d), where known) are checked and recorded in the report's
    `expert_diagnostics`; findings are logged as warnings, and an expert
    far from the base is refused unless `force` (see `check_experts`). Paths and task names are checked first
    (`checked_inputs`): a missing path or pickle weights are named with their expert."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    base_dir, paths = checked_inputs(base_dir, expert_dirs)
    if out_dir is not None:
        check_merge_output(out_dir, base_dir, expert_dirs, overwrite=overwrite)
    spec, checked = resolve(method, params)
    sequential = isinstance(checked, DataAwareParams) and checked.sequential
    if not expert_dirs:
        raise ValueError("at least one expert is needed")
    resolve_weights(method, weights, list(expert_dirs))
    if spec.data_aware and not calibration_texts:
        raise ValueError(f"method {method!r} is data-aware: give calibration texts for every expert")
    if calibration_texts is not None:
        missing = [task for task in expert_dirs if not calibration_texts.get(task)]
        unknown = sorted(set(calibration_texts) - set(expert_dirs))
        if missing or unknown:
            raise ValueError(
                f"calibration texts are needed for exactly the experts {sorted(expert_dirs)}: "
                f"missing or empty for {missing}, unknown tasks {unknown}"
            )
    problems = compatibility_problems(base_dir, paths)
    layout = encoder_layout(base_dir)
    base = LazyCheckpoint(base_dir, layout)
    states = {task: LazyCheckpoint(path, layout) for task, path in paths.items()}
    problems += layout_problems(layout, base)
    problems += state_dict_problems(base.meta(), {task: state.meta() for task, state in states.items()})
    if problems:
        raise ValueError(f"cannot merge into {base_dir}:\n  " + "\n  ".join(problems))
    diagnostics = check_experts(heads or {}, {task: task_vector_norm(base, state) for task, state in states.items()},
                                force=force)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    timings["load_and_check"] = time.perf_counter() - start

    start = time.perf_counter()
    batches = {
        task: text_batches(tokenizer, texts, batch_size, max_length)
        for task, texts in (calibration_texts or {}).items()
    }
    if sequential:
        base_model = _load_encoder(base_dir)
        whole = {task: _load_encoder(path).state_dict() for task, path in paths.items()}
        result = merge_sequential(
            base_model, base_model.state_dict(), whole, method, checked, batches, progress=progress
        )
        report, tensors = result.report, iter(result.state_dict.items())
        del base_model, whole
    else:
        grams = None
        if batches:
            changed = set(changed_parameters(base, states, checked.freeze))
            layers = [name for name in layout.linear_layers if f"{name}.weight" in changed]
            grams = _grams_one_expert_at_a_time(paths, batches, layers, progress)
        timings["calibration"] = time.perf_counter() - start
        start = time.perf_counter()
        report, tensors = iter_merge(base, states, method, checked, grams, progress=progress, weights=weights)
    report.expert_diagnostics = diagnostics
    report.timings = {**timings, **report.timings}
    if out_dir is None:
        state: Mapping[str, Tensor] = dict(tensors)
        if not sequential:  # merge_sequential timed its own stages
            report.timings["merge"] = time.perf_counter() - start
        return MergeResult(state, report)
    _write(out_dir, layout, base, tensors, tokenizer, report, timing="save" if sequential else "merge_and_save")
    return MergeResult(LazyCheckpoint(out_dir, layout), report)
