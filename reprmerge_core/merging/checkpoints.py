"""Merge transformers checkpoint directories: compatibility checks, calibration, merge, save."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from reprmerge_core.artifacts import atomic_dir, check_output
from reprmerge_core.backbone import quiet_transformers
from reprmerge_core.merging.calibration import collect_grams, linear_layers, text_batches
from reprmerge_core.merging.diagnostics import ExpertDiagnostics, diagnose_experts, task_vector_norm
from reprmerge_core.merging.merge import (
    MergeResult,
    changed_parameters,
    merge_state_dicts,
    resolve,
    state_dict_problems,
)
from reprmerge_core.merging.params import DataAwareParams, MergeParams
from reprmerge_core.merging.sequential import merge_sequential

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


def _load_encoder(path: Path) -> PreTrainedModel:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a transformers checkpoint (no config.json)")
    with quiet_transformers():
        return AutoModel.from_pretrained(path, local_files_only=True)


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


def check_experts(heads: Mapping[str, Tensor], norms: Mapping[str, float] | None) -> ExpertDiagnostics:
    """`diagnose_experts`, with each finding logged as a warning so a user sees it before trusting the merge."""
    diagnostics = diagnose_experts(heads, norms)
    for message in diagnostics.warnings:
        logger.warning(message)
    return diagnostics


def distances_from_base(base_dir: Path, expert_dirs: Mapping[str, Path]) -> dict[str, float]:
    """Each expert's task-vector norm from the base checkpoint, holding one expert in memory at a time."""
    base = _load_encoder(base_dir).state_dict()
    return {task: task_vector_norm(base, _load_encoder(path).state_dict()) for task, path in expert_dirs.items()}


def check_merge_output(out_dir: str | Path, base_dir: str | Path, expert_dirs: Mapping[str, str | Path], *,
                       overwrite: bool) -> None:
    """Refuse an output that exists (unless `overwrite`) or overlaps the base or an expert (always)."""
    check_output(out_dir, {"base": base_dir, **{f"expert {task!r}": path for task, path in expert_dirs.items()}},
                 overwrite=overwrite)


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
) -> MergeResult:
    """Merge expert encoders (AutoModel; a classification head in an expert directory is ignored) into
    the base. `calibration_texts[task]` are unlabeled inputs of each expert's task: required by data-aware
    methods, and with any method they add per-layer rho to the report. With `out_dir`, writes the merged
    checkpoint (safetensors + the base's tokenizer) and merge_report.json, atomically; an existing `out_dir`
    is replaced only with `overwrite`, and one that is, holds or sits inside the base or an expert is refused
    (both before any loading). Incompatible checkpoints and
    bad parameters are refused before any weights are merged. Before merging, the experts' distances
    from the base and the alignment of their `heads` (task -> head weight (classes, d), where known) are
    checked and recorded in the report's `expert_diagnostics`; findings are logged as warnings."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if out_dir is not None:
        check_merge_output(out_dir, base_dir, expert_dirs, overwrite=overwrite)
    spec, checked = resolve(method, params)
    sequential = isinstance(checked, DataAwareParams) and checked.sequential
    if not expert_dirs:
        raise ValueError("at least one expert is needed")
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
    base_dir = Path(base_dir)
    paths = {task: Path(path) for task, path in expert_dirs.items()}
    problems = compatibility_problems(base_dir, paths)
    base_model = _load_encoder(base_dir)
    experts = {task: _load_encoder(path) for task, path in paths.items()}
    base = base_model.state_dict()
    states = {task: model.state_dict() for task, model in experts.items()}
    problems += state_dict_problems(base, states)
    if problems:
        raise ValueError(f"cannot merge into {base_dir}:\n  " + "\n  ".join(problems))
    diagnostics = check_experts(heads or {}, {task: task_vector_norm(base, state) for task, state in states.items()})
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    timings["load_and_check"] = time.perf_counter() - start

    start = time.perf_counter()
    batches = {
        task: text_batches(tokenizer, texts, batch_size, max_length)
        for task, texts in (calibration_texts or {}).items()
    }
    if sequential:
        result = merge_sequential(base_model, base, states, method, checked, batches, progress=progress)
    else:
        grams = None
        if batches:
            changed = set(changed_parameters(base, states, checked.freeze))
            layers = [name for name in linear_layers(base_model) if f"{name}.weight" in changed]
            grams = {
                task: collect_grams(
                    experts[task], batches[task], layers, desc=f"calibration {task}" if progress else None
                )
                for task in experts
            }
        timings["calibration"] = time.perf_counter() - start
        start = time.perf_counter()
        result = merge_state_dicts(base, states, method, checked, grams, progress=progress)
        timings["merge"] = time.perf_counter() - start
    result.report.timings = {**timings, **result.report.timings}
    result.report.expert_diagnostics = diagnostics

    if out_dir is not None:
        start = time.perf_counter()
        base_model.load_state_dict(result.state_dict)
        with atomic_dir(out_dir) as out:
            base_model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            result.report.timings["save"] = time.perf_counter() - start
            (out / REPORT_FILE).write_text(result.report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return result
