"""`reprmerge build --config recipe.yaml`: a bundle from the user's own checkpoints in one command.

A recipe names the base, the experts (name, path, optional weight), the merge (reprmerge's `merge:
{method, parameters}`, or `mergekit: FILE` whose method and parameters map, see `merging.mergekit`, or
`backbone: DIR` already merged, e.g. by mergekit), the calibration inputs per task and the correction
(beta, prior, folds). It is validated before any work; every error names the YAML path of the bad field
(`experts[1].path: ... does not exist`). The build calls `merge_checkpoints` then `calibrate_bundle`, and
records the recipe (`extra.build_recipe`) and the merge's parameters in the manifest, which `inspect` shows.
Relative paths are relative to the recipe file (a mergekit file's, to that file).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from reprmerge_core.artifacts import check_output, replace_dir
from reprmerge_core.bundle.card import MERGEKIT_CONFIG
from reprmerge_core.bundle.io import amend_manifest
from reprmerge_core.bundle.manifest import MergeInfo
from reprmerge_core.checks import checkpoint_problem, task_name_problem
from reprmerge_core.choices import MERGE_METHODS, POOLINGS, check_beta, check_prior
from reprmerge_core.data.files import read_texts
from reprmerge_core.merging import merge_checkpoints, resolve, resolve_weights
from reprmerge_core.merging.checkpoints import read_merge_report
from reprmerge_core.merging.mergekit import MergekitError, map_mergekit
from reprmerge_core.pipeline.calibrate import calibrate_bundle


class RecipeError(ValueError):
    """A recipe that cannot be built; `field` is the YAML path of the bad value (e.g. `experts[1].path`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def yaml_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as a YAML path: ('experts', 1, 'path') -> experts[1].path."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top)"


def _existing(kind: Literal["file", "checkpoint"]) -> Any:
    """A path resolved against the recipe's folder (validation context `root`) that must exist as `kind`
    (a checkpoint: a folder with config.json and safetensors weights, see `reprmerge_core.checks`)."""

    def check(value: Path, info: ValidationInfo) -> Path:
        root = Path((info.context or {}).get("root", "."))
        path = value if value.is_absolute() else root / value
        if not path.exists():
            raise ValueError(f"{path} does not exist")
        if kind == "file" and not path.is_file():
            raise ValueError(f"{path} is not a file")
        problem = checkpoint_problem(path) if kind == "checkpoint" else None
        if problem is not None:
            raise ValueError(problem)
        return path

    return AfterValidator(check)


Checkpoint = Annotated[Path, _existing("checkpoint")]


def _task_name(name: str) -> str:
    """The one task-name rule (`reprmerge_core.checks`), as every command applies it."""
    problem = task_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name
ExistingFile = Annotated[Path, _existing("file")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertSpec(_Strict):
    name: Annotated[str, AfterValidator(_task_name)] = Field(description="the task's name (letters, digits, _ . -)")
    path: Checkpoint
    weight: float | None = Field(None, allow_inf_nan=False, description="scales the expert's task vector")


class MergeSpec(_Strict):
    method: Literal[MERGE_METHODS]  # type: ignore[valid-type]
    parameters: dict[str, Any] = Field(default_factory=dict)


class CorrectionSpec(_Strict):
    beta: Annotated[float | Literal["auto"], AfterValidator(check_beta)] = Field(
        "auto", description="correction strength, or auto (k-fold CV)")
    prior: Annotated[float | Literal["auto", "procrustes", "identity"], AfterValidator(check_prior)] = "auto"
    folds: int = Field(5, ge=2)


class Recipe(_Strict):
    """The recipe file's schema; exactly one of `merge`, `mergekit` and `backbone` says how the backbone is made."""

    base: Checkpoint | None = None
    experts: list[ExpertSpec] = Field(min_length=1)
    merge: MergeSpec | None = None
    mergekit: ExistingFile | None = None
    backbone: Checkpoint | None = None
    calibration: dict[str, ExistingFile]
    correction: CorrectionSpec = CorrectionSpec()
    pooling: Literal[POOLINGS] = "mean"  # type: ignore[valid-type]
    max_length: int = Field(128, ge=1)
    batch_size: int = Field(32, ge=1)
    base_model: str | None = Field(None, description="the base's model id on a hub, for the model card")
    force: bool = Field(False, description="use an expert far from the base (refused by default: most likely not "
                                           "fine-tuned from it)")

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        ways = [k for k in ("merge", "mergekit", "backbone") if getattr(self, k) is not None]
        if len(ways) != 1:
            raise ValueError(f"give exactly one of merge, mergekit and backbone; got {ways or 'none'}")
        if ways == ["merge"] and self.base is None:
            raise ValueError("base is required to merge (the checkpoint the experts were fine-tuned from)")
        names = [e.name for e in self.experts]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise RecipeError(f"experts[{i}].name", f"{name!r} is given twice")
        for name in self.calibration:
            if name not in names:
                raise RecipeError(f"calibration.{name}", f"no expert is named {name!r}; experts: {', '.join(names)}")
        for name in names:
            if name not in self.calibration:
                raise RecipeError("calibration", f"missing the inputs of expert {name!r}")
        return self


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return "(file)" if mark is None else f"line {mark.line + 1}, column {mark.column + 1}"


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; any problem raises `RecipeError` naming the YAML path."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError("(file)", f"cannot read the recipe ({exc})") from None
    except yaml.YAMLError as exc:
        raise RecipeError(_yaml_where(exc), f"not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError("(top)", "a recipe is a YAML mapping (base, experts, merge, calibration, ...)")
    try:
        return Recipe.model_validate(raw, context={"root": path.resolve().parent})
    except ValidationError as exc:
        err = exc.errors()[0]
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, RecipeError):
            raise RecipeError(cause.field, cause.message) from None
        message = err["msg"].removeprefix("Value error, ")
        raise RecipeError(yaml_path(tuple(err["loc"])), message) from None


def _mergekit_merge(recipe: Recipe) -> tuple[Path, str, dict[str, Any], dict[str, float]]:
    """The base, method, parameters and per-expert weights (by expert name) of the recipe's mergekit file; its
    models must be the recipe's experts."""
    assert recipe.mergekit is not None
    file = recipe.mergekit
    try:
        mapped = map_mergekit(yaml.safe_load(file.read_text(encoding="utf-8")))
    except MergekitError as exc:
        raise RecipeError(f"mergekit ({file}) {exc.field}", exc.message) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"mergekit ({file}) {_yaml_where(exc)}",
                          f"not valid YAML: {getattr(exc, 'problem', None) or exc}") from None

    def resolved(text: str) -> Path:
        return (file.parent / text).resolve()

    base = resolved(mapped.base)
    if not base.is_dir():
        raise RecipeError(f"mergekit ({file}) base_model", f"{base} does not exist")
    if recipe.base is not None and recipe.base.resolve() != base:
        raise RecipeError("base", f"{recipe.base} differs from the mergekit base_model {mapped.base!r} ({base})")
    models = {resolved(m): m for m in mapped.models}
    for i, expert in enumerate(recipe.experts):
        if expert.weight is not None:
            raise RecipeError(f"experts[{i}].weight", "with a mergekit file, weights come from its models[].parameters")
        if expert.path.resolve() not in models:
            raise RecipeError(f"experts[{i}].path", f"{expert.path} is not among the mergekit models "
                                                    f"({', '.join(mapped.models)})")
    given = {e.path.resolve() for e in recipe.experts}
    for path, text in models.items():
        if path not in given:
            raise RecipeError(f"mergekit ({file}) models", f"{text!r} is not one of the recipe's experts")
    weights = {e.name: mapped.weights[models[e.path.resolve()]] for e in recipe.experts if mapped.weights}
    return base, mapped.method, mapped.params, weights


def _weights(recipe: Recipe, method: str) -> dict[str, float]:
    """The experts' weights for `merge_checkpoints` (unset: 1), refused where the method takes none."""
    weights = {e.name: e.weight for e in recipe.experts if e.weight is not None}
    try:
        resolve_weights(method, weights, [e.name for e in recipe.experts])
    except ValueError as exc:
        i = next(i for i, e in enumerate(recipe.experts) if e.weight not in (None, 1.0))
        raise RecipeError(f"experts[{i}].weight", str(exc)) from None
    return weights


def _merged_elsewhere(backbone: Path) -> tuple[str, dict[str, Any]]:
    """How an already merged backbone was made, as far as it says: a mergekit output's method and parameters."""
    config = backbone / MERGEKIT_CONFIG
    if not config.is_file():
        return "unknown", {}
    try:
        raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError("backbone", f"{config} is not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(raw, dict):
        return "unknown", {}
    models = raw.get("models") if isinstance(raw.get("models"), list) else []
    return f"mergekit:{raw.get('merge_method')}", {
        "parameters": raw.get("parameters") or {},
        "models": [{"model": m.get("model"), **(m.get("parameters") or {})} for m in models if isinstance(m, dict)]}


def _merge_plan(recipe: Recipe) -> tuple[Path | None, str, dict[str, Any], dict[str, float]]:
    """(base, method, validated parameters as JSON, per-expert weights) before any work; errors name the recipe
    field."""
    if recipe.backbone is not None:
        return recipe.base, *_merged_elsewhere(recipe.backbone), {}
    if recipe.mergekit is not None:
        base, method, params, weights = _mergekit_merge(recipe)
    else:
        assert recipe.merge is not None and recipe.base is not None
        base, method, params = recipe.base, recipe.merge.method, recipe.merge.parameters
        weights = _weights(recipe, method)
    try:
        _, checked = resolve(method, params)
    except ValueError as exc:
        raise RecipeError("merge.parameters" if recipe.merge else "mergekit", str(exc)) from None
    return base, method, checked.model_dump(mode="json"), weights


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_from_recipe(path: str | Path, out: str | Path, *, overwrite: bool = False, device: str = "auto",
                      progress: bool = True) -> Path:
    """Validate the recipe, merge (unless `backbone` is given), calibrate and write the bundle to `out` atomically."""
    path, out = Path(path), Path(out)
    recipe = load_recipe(path)
    base, method, params, weights = _merge_plan(recipe)
    experts = {e.name: e.path for e in recipe.experts}
    inputs: dict[str, Path] = {"recipe": path, **{f"expert {n!r}": p for n, p in experts.items()},
                               **{f"calibration file of {n!r}": p for n, p in recipe.calibration.items()}}
    for name, value in (("base", base), ("backbone", recipe.backbone), ("mergekit file", recipe.mergekit)):
        if value is not None:
            inputs[name] = value
    check_output(out, inputs, overwrite=overwrite)
    texts = {name: read_texts(file) for name, file in recipe.calibration.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.build-", dir=out.parent) as work:
        extra: dict[str, Any] = {}
        if recipe.backbone is not None:
            merged, source = recipe.backbone, str(recipe.backbone)
        else:
            assert base is not None
            merged = Path(work) / "merged"
            data_aware = resolve(method, params)[0].data_aware
            result = merge_checkpoints(base, experts, method, params, texts if data_aware else None, merged,
                                       batch_size=recipe.batch_size, max_length=recipe.max_length, progress=progress,
                                       weights=weights, force=recipe.force)
            if recipe.mergekit is not None:  # the user's merge recipe travels with the backbone
                shutil.copy2(recipe.mergekit, merged / MERGEKIT_CONFIG)
            extra["merge_report"] = result.report.model_dump(mode="json")
            source = f"{method} merge of {len(experts)} experts into {base}"
        bundle = calibrate_bundle(merged, experts, texts, Path(work) / "bundle", pooling=recipe.pooling,
                                  max_length=recipe.max_length, beta=recipe.correction.beta,
                                  prior=recipe.correction.prior, folds=recipe.correction.folds,
                                  merge_method=method if recipe.backbone is None else "unknown",
                                  device=device, batch_size=recipe.batch_size, progress=progress, base=base,
                                  force=recipe.force)
        recorded = recipe.model_dump(mode="json")
        extra["build_recipe"] = {"file": str(path.resolve()), "sha256": _sha256(path), "recipe": recorded}
        if recipe.base_model is not None:
            extra["base_model"] = recipe.base_model
        # A given backbone's mergekit file says how it was made; else a merge_report.json (merged here, or by
        # `reprmerge merge`) already gave calibrate_bundle the method, every parameter and the weights.
        described = recipe.backbone is not None and method != "unknown"
        merge = MergeInfo(method=method, parameters=params) if described or not read_merge_report(merged) else None
        amend_manifest(bundle, merge=merge, backbone_source=source, extra=extra)
        replace_dir(bundle, out)
    return out

