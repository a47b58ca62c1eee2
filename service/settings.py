"""Service configuration: command-line flags or `REPRMERGE_*` environment variables (flags win)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Everything an operator can tune; defaults suit one CPU or one GPU replica."""

    model_config = SettingsConfigDict(env_prefix="REPRMERGE_", extra="forbid")

    bundle: Path = Field(description="bundle directory to serve")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_name: str = Field("reprmerge", pattern=r"^[A-Za-z0-9_.\-]+$", description="model name on the /v2 routes")

    # Batching and admission control.
    max_batch_size: int = Field(32, ge=1, description="most inputs (texts) in one backbone pass")
    max_batch_wait: float = Field(0.002, ge=0, le=1, description="seconds a batch may wait to fill while the model is busy")
    queue_limit: int = Field(256, ge=1, description="most requests waiting; more are refused with 429")
    default_timeout: float = Field(30.0, gt=0, description="deadline in seconds when a request sets no X-Request-Timeout")
    drain_timeout: float = Field(30.0, gt=0, description="most seconds to finish accepted requests after SIGTERM")

    # Heads.
    head_cache_bytes: int = Field(64 << 20, ge=0, description="budget of the fused-head LRU cache in bytes")
    preference_grid: int | None = Field(None, ge=1, description="snap preferences to multiples of 1/grid")
    solve_dtype: Literal["float64", "float32"] = Field(
        "float32", description="precision of head solves: float32 (~3x faster) falls back to float64, the reference, "
                               "for any preference whose condition bound exceeds 1e4")

    # Request limits.
    api_key: SecretStr | None = Field(None, description="bearer key required on every route but probes and /metrics")
    max_body_bytes: int = Field(2 << 20, ge=1024)
    max_inputs: int = Field(32, ge=1, description="most texts per request")
    max_text_chars: int = Field(10_000, ge=1, description="longest text accepted, in characters")
    max_preferences: int = Field(16, ge=1, description="most preferences answered in one request")
