"""The bundle manifest schema (`manifest.json`), validated with pydantic."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from reprmerge_core.checks import TASK_NAME_PATTERN
from reprmerge_core.choices import POOLINGS, Normalisation
from reprmerge_core.diagnostics import ExpertDiagnostics

FORMAT = "reprmerge-bundle"
FORMAT_VERSION = 2  # 2: the prior is `correction.identity_weight` (chosen by cross-validation), not `use_prior`
SUPPORTED_VERSIONS = (1, 2)

STATISTICS_FILE = "statistics.safetensors"
HEADS_FILE = "heads.safetensors"
BACKBONE_DIR = "backbone"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"  # the model card: derived from the manifest, not listed in it (see `card`)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskInfo(_Strict):
    name: str = Field(min_length=1, pattern=TASK_NAME_PATTERN)
    labels: list[str] = Field(min_length=2)
    calibration_samples: int = Field(ge=1)

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("label names must be unique")
        return v


class CorrectionInfo(_Strict):
    """How corrections are solved. `identity_weight` alpha sets the prior O_t = alpha I + (1 - alpha) Procrustes_t.

    Format 1 manifests said `use_prior` (true: Procrustes, alpha 0; false: identity, alpha 1); they still load.
    """

    beta: float = Field(gt=0, allow_inf_nan=False)
    normalisation: Normalisation
    identity_weight: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    beta_selection: dict[str, Any] | None = None
    prior_selection: dict[str, Any] | None = None  # the cross-validated choice of alpha and its curve

    @model_validator(mode="before")
    @classmethod
    def _format_1_prior(cls, data: Any) -> Any:
        if isinstance(data, dict) and "use_prior" in data:
            data = dict(data)
            use_prior = data.pop("use_prior")
            if not isinstance(use_prior, bool):
                raise ValueError("use_prior must be true or false")
            if "identity_weight" in data:
                raise ValueError("give identity_weight or the format 1 use_prior, not both")
            data["identity_weight"] = 0.0 if use_prior else 1.0
        return data

    @property
    def prior(self) -> str:
        """The prior in words, for logs and reports."""
        a = self.identity_weight
        return "procrustes" if a == 0 else "identity" if a == 1 else f"{a:g} identity + {1 - a:g} procrustes"


class MergeInfo(_Strict):
    """The merge that made the backbone: method, its resolved parameters (defaults included) and each expert's
    weight; empty when unknown (a backbone merged elsewhere without a merge report)."""

    method: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    weights: dict[str, float] = Field(default_factory=dict)


class BackboneInfo(_Strict):
    source: str = Field(min_length=1)
    pooling: str = Field(pattern=f"^({'|'.join(POOLINGS)})$")
    max_length: int = Field(ge=1)


class Manifest(_Strict):
    format: str = Field(pattern=f"^{FORMAT}$")
    format_version: int
    bundle_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    library_version: str
    created_at: str
    representation_dim: int = Field(ge=1)
    tasks: list[TaskInfo] = Field(min_length=1)
    correction: CorrectionInfo
    merge: MergeInfo
    backbone: BackboneInfo
    files: dict[str, str]
    extra: dict[str, Any] = Field(default_factory=dict)
    # Head alignment and distance from the base measured before merging (absent in bundles made before it).
    expert_diagnostics: ExpertDiagnostics | None = None

    @field_validator("files")
    @classmethod
    def _hex_digests(cls, v: dict[str, str]) -> dict[str, str]:
        for name, digest in v.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"{name}: not a sha256 hex digest")
            if name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"{name}: file paths must stay inside the bundle")
        return v

    @model_validator(mode="after")
    def _unique_tasks(self) -> Manifest:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError("task names must be unique")
        return self

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]
