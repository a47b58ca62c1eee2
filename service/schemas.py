"""Request and response bodies of the /v1 API (pydantic; shared by the app, OpenAPI and the client).

Kept free of torch so the client imports only pydantic and httpx.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

def unicode_text(value: str) -> str:
    """Refuse lone UTF-16 surrogates (JSON `"\\ud800"`, or raw bytes ED A0 80, which Python's JSON decoder lets in).

    The tokenizer raises on them for the whole batch they share, so they are stopped at validation.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"character {exc.start} is a lone UTF-16 surrogate, which is not valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(unicode_text)]

# Strict: "0.5" or true are not weights; NaN and negative weights pass here and are refused with
# their field name by canonical_preference.
Weight = Annotated[float, Field(strict=True)]
PreferenceValue = Annotated[
    dict[str, Weight] | list[Weight],
    Field(description="task -> weight (tasks left out weigh 0), or one weight per task in bundle order; scale is irrelevant",
          examples=[{"sst2": 0.7, "trec6": 0.3}, [1, 1, 1]]),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PreferencesIn(_Body):
    """One preference, or several answered together; neither means the uniform preference."""

    preference: PreferenceValue | None = None
    preferences: list[PreferenceValue] | None = Field(None, min_length=1, description="several preferences at once")


class PredictRequest(PreferencesIn):
    texts: list[Text] = Field(min_length=1, description="inputs to classify")
    tasks: list[str] | None = Field(None, min_length=1, description="tasks to answer; default all")
    quality_kept: bool = Field(False, description=(
        "also answer `quality_kept` per task and preference; a preference not seen before costs one closed-form "
        "trade-off on the heads thread (about 10x its head fold), cached after that"))
    truncate: bool = Field(False, description=(
        "cut texts longer than the service's limit (`max_text_chars` in /v1/info) to that many characters instead "
        "of refusing the request with 413, as text-embeddings-inference's `truncate`; for ordinary text the answer "
        "is the whole text's, since the backbone reads only its first `max_length` tokens"))


class TaskPrediction(BaseModel):
    label: str
    probabilities: dict[str, float]


QUALITY_KEPT = (
    "how much of the task's attainable quality this preference keeps, in [0, 1], from the closed-form trade-off: "
    "(L_t(I) - L_t(W_p)) / (L_t(I) - L_t(W_t)) clipped, where L_t is the task's loss on the calibration statistics "
    "(/v1/tradeoff), W_t its own one-hot correction and I the uncorrected merged backbone. 1: as good as the task "
    "gets (its one-hot preference); 0: no better than the uncorrected backbone, typically a task left at weight 0, "
    "whose labels should not be trusted. A representation-loss proxy, not an accuracy; 4 decimals"
)


class PreferenceResult(BaseModel):
    preference: dict[str, float] = Field(description="canonical preference (sums to 1, snapped if the service snaps)")
    fingerprint: str = Field(description="id of the fused head that answered")
    quality_kept: dict[str, float] | None = Field(
        None, description=f"per task answered, when the request sets `quality_kept`: {QUALITY_KEPT}",
        examples=[{"sms_spam": 1.0, "trec6": 0.0}])
    predictions: list[dict[str, TaskPrediction]] = Field(description="per input, per task")


class PredictResponse(BaseModel):
    bundle_id: str
    results: list[PreferenceResult] = Field(description="one per preference, in request order")


class TradeoffRequest(PreferencesIn):
    pass


class TaskLoss(BaseModel):
    loss: float = Field(description="closed-form loss L_t(W_p) of this task's representation (normalised statistics)")
    best: float = Field(description="the same loss at the task's own one-hot correction: the lowest reachable")
    uncorrected: float = Field(description="the same loss of the uncorrected merged backbone (W = I)")
    quality_kept: float = Field(ge=0, le=1, description=QUALITY_KEPT)


class TradeoffResult(BaseModel):
    preference: dict[str, float]
    fingerprint: str
    tasks: dict[str, TaskLoss]


class TradeoffResponse(BaseModel):
    bundle_id: str
    results: list[TradeoffResult]


class TaskMeta(BaseModel):
    name: str
    labels: list[str]


class Limits(BaseModel):
    max_body_bytes: int
    max_inputs: int
    max_text_chars: int
    max_preferences: int
    max_batch_size: int
    queue_limit: int
    preference_grid: int | None
    default_timeout_s: float


class InfoResponse(BaseModel):
    bundle_id: str
    model_name: str
    tasks: list[TaskMeta]
    representation_dim: int
    device: str
    merge: dict[str, object]
    correction: dict[str, object]
    limits: Limits
    versions: dict[str, str]


class ReloadRequest(_Body):
    bundle: str | None = Field(None, min_length=1, description="bundle directory to serve next; default: the configured one")


class ReloadResponse(BaseModel):
    bundle_id: str = Field(description="the bundle now served")
    previous_bundle_id: str
    bundle: str = Field(description="the directory it was loaded from")
    load_seconds: float = Field(description="time to load, validate and warm the bundle while the previous one served")


class Problem(BaseModel):
    """RFC 9457 problem details, plus the request id and, for 422, the offending field."""

    type: str
    title: str
    status: int
    detail: str
    request_id: str
    field: str | None = None
