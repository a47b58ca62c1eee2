"""Validated parameters of each merge method (pydantic), so bad values fail before any tensor work."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

LAMBDA = AliasChoices("lam", "lambda")


class MergeParams(BaseModel):
    """Options every method shares.

    `freeze`: fnmatch patterns of parameter names that stay exactly at the base (e.g. `embeddings.*`).
    Parameters that every expert left equal to the base are copied bit-exactly even without a pattern.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    freeze: tuple[str, ...] = ()


class TaskArithmeticParams(MergeParams):
    """theta = theta_0 + lam * sum_k tau_k. Default 0.3: the best plain value in the project's pilot (data.md)."""

    lam: float = Field(0.3, validation_alias=LAMBDA, allow_inf_nan=False)


class TiesParams(MergeParams):
    """TIES: keep the top `density` fraction of each tau_k by magnitude (PEFT/mergekit `density`), elect the
    sign with the larger summed mass, average the agreeing entries, scale by lam."""

    density: float = Field(0.2, ge=0.0, le=1.0)
    lam: float = Field(1.0, validation_alias=LAMBDA, allow_inf_nan=False)


class DareParams(MergeParams):
    """DARE: drop each entry of tau_k with probability `drop_rate`, rescale survivors by 1/(1 - drop_rate),
    then combine linearly (lam * sum) or with TIES sign election and disjoint mean (times lam)."""

    drop_rate: float = Field(0.5, ge=0.0, lt=1.0)
    lam: float = Field(0.3, validation_alias=LAMBDA, allow_inf_nan=False)
    combine: Literal["linear", "ties"] = "linear"
    seed: int = Field(0, ge=0)


class BreadcrumbsParams(MergeParams):
    """Model Breadcrumbs (mergekit `breadcrumbs`, `breadcrumbs_ties` with combine=ties): per tau_k drop the
    `gamma` fraction of largest magnitudes (outliers) and the smallest, keeping the `density` fraction, then
    combine linearly (lam * sum) or with TIES sign election and disjoint mean (times lam).
    Defaults: mergekit's gamma 0.01; density 0.9 and lam 0.3 as a mild trim of task arithmetic."""

    density: float = Field(0.9, ge=0.0, le=1.0)
    gamma: float = Field(0.01, ge=0.0, le=1.0)
    lam: float = Field(0.3, validation_alias=LAMBDA, allow_inf_nan=False)
    combine: Literal["linear", "ties"] = "linear"

    @model_validator(mode="after")
    def _fractions_fit(self) -> BreadcrumbsParams:
        if self.density + self.gamma > 1.0:
            raise ValueError(
                f"density + gamma must be <= 1 (kept + dropped outliers), got {self.density} + {self.gamma}"
            )
        return self


class DataAwareParams(MergeParams):
    """Options of the methods that use calibration inputs.

    `lam`: task-arithmetic coefficient for parameters outside linear layers; None means 1/K (averaging).
    `sequential`: calibration inputs of each linear layer come from the already-merged earlier layers
    instead of each expert's own forward pass (needs a model, so only merge_sequential/merge_checkpoints).
    """

    lam: float | None = Field(None, validation_alias=LAMBDA, allow_inf_nan=False)
    sequential: bool = False


class RegMeanParams(DataAwareParams):
    """RegMean. `alpha` scales the off-diagonal of every Gram (RegMean paper; 1 = exact, 0 = diagonal only);
    `ridge` adds ridge * mean(diag S) to the summed Gram so unused input directions cannot make it singular."""

    alpha: float = Field(0.9, ge=0.0, le=1.0)
    ridge: float = Field(1e-8, ge=0.0)


class ProjectionParams(DataAwareParams):
    """Output-space projection QP. `basis`: `diagonal` (one coefficient per task and output row) or `eigen`
    (one per task and leading eigenvector of the residual-energy matrix E; `rank` of them, default all).
    `ridge`: relative ridge on each K x K system, only there to keep singular systems solvable."""

    basis: Literal["diagonal", "eigen"] = "diagonal"
    rank: int | None = Field(None, ge=1)
    ridge: float = Field(1e-10, ge=0.0)

    @model_validator(mode="after")
    def _rank_needs_eigen(self) -> ProjectionParams:
        if self.rank is not None and self.basis != "eigen":
            raise ValueError("rank applies only to basis='eigen'")
        return self


def validate_params(cls: type[MergeParams], method: str, values: dict[str, object]) -> MergeParams:
    """Build `cls` from raw values; errors name the method and each offending field."""
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid parameters for method {method!r}: {problems}") from None
