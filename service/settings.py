"""Service configuration: command-line flags or `REPRMERGE_*` environment variables (flags win)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


ENV_PREFIX = "REPRMERGE_"
# REPRMERGE_* variables that belong to the library, not to the service.
LIBRARY_VARIABLES = frozenset({"REPRMERGE_CACHE"})


class ServiceSettings(BaseSettings):
    """Everything an operator can tune; defaults suit one CPU or one GPU replica.

    Fail closed: an unknown `REPRMERGE_*` variable refuses to start (a misspelled
    `REPRMERGE_API_KEYS` would otherwise serve without auth), and so does an empty API key
    (unset the variable to serve without one).
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    bundle: Path = Field(description="bundle directory to serve")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_name: str = Field("reprmerge", pattern=r"^[A-Za-z0-9_.\-]+$", description="model name on the /v2 routes")

    # Batching and admission control.
    max_batch_size: int = Field(32, ge=1, description="most inputs (texts) in one backbone pass")
    max_batch_tokens: int = Field(
        8192, ge=1, description="most padded tokens (texts x longest text) in one backbone pass; a larger request is "
                                "split across passes, and only a single text wider than this runs alone over it")
    max_batch_wait: float = Field(0.002, ge=0, le=1, description="seconds a batch may wait to fill while the model is busy")
    queue_limit: int = Field(256, ge=1, description="most requests waiting; more are refused with 429")
    default_timeout: float = Field(30.0, gt=0, description="deadline in seconds when a request sets no X-Request-Timeout")
    drain_timeout: float = Field(
        30.0, gt=0, description="most seconds from SIGTERM to exit (keep the pod's grace period above it)")
    drain_grace: float = Field(
        3.0, ge=0, description="seconds after SIGTERM that the listener stays open (within drain_timeout) even when "
        "idle, so readiness probes and load balancers see 503 and stop routing before connections are refused")

    trace_backbone: bool = Field(
        True, description="run the backbone as a TorchScript trace (checked against eager at load; eager if it differs): "
        "it does not contend with request handling for the GIL")
    inline_codec_chars: int = Field(
        1000, ge=0, description="requests of at most this many characters are tokenised, and answers of about this "
        "size rendered, on the event loop: a hop to the codec threads costs more (~0.2 ms) than such work")
    tokenizer_threads: int = Field(
        1, ge=1, le=64, description="threads that tokenise requests at admission and render responses, off the event loop")

    # Heads.
    head_cache_bytes: int = Field(64 << 20, ge=0, description="budget of the fused-head LRU cache in bytes")
    preference_grid: int | None = Field(None, ge=1, description="snap preferences to multiples of 1/grid")
    solve_dtype: Literal["float64", "float32"] = Field(
        "float32", description="precision of head solves: float32 (~3x faster) falls back to float64, the reference, "
                               "for any preference whose condition bound exceeds 1e4")

    # Threads: torch intra-op threads per executor, each set on its own thread. The backbone pass
    # is the only large computation; head work (a d x d Cholesky, K x d matmuls) is too small to gain
    # from a thread team, and on a busy CPU a team waits on descheduled members (one solve: 1.7 ms on
    # 1 thread, 20+ ms on 2). A 2-core box: 2 inference workers of 1 thread, heads 1 (the defaults).
    # A big CPU pod: 2 workers sharing the pod's CPU request (set OMP_NUM_THREADS, as deploy/k8s does:
    # a cgroup quota is not visible as CPUs), heads 1 unless a measurement on that pod says otherwise.
    inference_workers: int | None = Field(
        None, ge=1, le=64, description="backbone passes that run at once, each on its own thread; default: 2 on a CPU "
                                       "with 2 or more cores, else 1")
    inference_threads: int | None = Field(
        None, ge=1, description="intra-op threads of each backbone pass; default: the CPUs (OMP_NUM_THREADS, else the "
                                "CPUs this process may run on) shared among the workers")
    heads_threads: int = Field(1, ge=1, description="intra-op threads of head solves, head application and trade-offs")

    # The heads thread (service/heads.py).
    heads_queue_limit: int = Field(
        64, ge=1, description="most trade-off preferences waiting for or on the heads thread; more are refused with 429")
    fold_chunk_bytes: int = Field(
        64 << 20, ge=1, description="bound on the temporaries of one head solve (chunks run one at a time on the heads "
                                    "thread); more preferences are solved in chunks (d = 384: 26 per chunk)")
    tradeoff_cache_entries: int = Field(4096, ge=0, description="trade-off results kept, by preference fingerprint")
    fail_solve_fingerprint: str | None = Field(
        None, pattern=r"^[0-9a-f]{16}$",
        description="fault injection for tests only: the head solve of the preference with this fingerprint raises")

    # Request limits.
    api_key: SecretStr | None = Field(None, description="bearer key required on every route but probes and /metrics")
    admin_without_auth: bool = Field(
        False, description="allow the /admin routes (bundle reload) when no API key is set: only where nobody "
                           "untrusted can reach the port; otherwise they answer 403 without a key")
    max_body_bytes: int = Field(2 << 20, ge=1024)
    max_inputs: int = Field(32, ge=1, description="most texts per request")
    max_text_chars: int = Field(10_000, ge=1, description="longest text accepted, in characters")
    max_preferences: int = Field(16, ge=1, description="most preferences answered in one request")

    @property
    def cpu_count(self) -> int:
        """OMP_NUM_THREADS as torch reads it, else the CPUs this process may run on."""
        omp = os.environ.get("OMP_NUM_THREADS", "")
        if omp.isdigit() and int(omp) > 0:
            return int(omp)
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    @property
    def inference_worker_count(self) -> int:
        """`inference_workers`; unset: 2 on a CPU with 2+ cores, 1 on CUDA (one device runs one pass at a time).

        Two single-threaded passes beat one two-threaded pass on 2 cores whenever request handling
        takes CPU too: a thread team waits at every operator for a member the scheduler took away,
        two independent passes do not (measured with 25% of a core busy elsewhere: 390-417 vs
        270-278 texts/s on the tiny bundle).
        """
        if self.inference_workers is not None:
            return self.inference_workers
        return 1 if self.device == "cuda" else min(2, self.cpu_count)

    @property
    def inference_thread_count(self) -> int:
        """`inference_threads`; unset: the CPUs shared among the inference workers."""
        if self.inference_threads is not None:
            return self.inference_threads
        return max(1, self.cpu_count // self.inference_worker_count)

    # HTTP connections (uvicorn).
    keep_alive: float = Field(
        75.0, gt=0, description="seconds an idle keep-alive connection stays open; well above client pool expiry "
        "(httpx 5 s, urllib3/aiohttp similar) so a client never reuses a connection the server is closing")
    header_timeout: float = Field(10.0, gt=0, description="seconds a client may take to send a request's headers")
    body_timeout: float = Field(10.0, gt=0, description="seconds a client may take to send a request's body; then 408")
    max_connections: int = Field(
        1000, ge=1, description="most open connections; more are answered 503 and closed at once (also capped "
        "below the open-file limit, so dribbling clients cannot exhaust file descriptors)")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_variables(cls, data: Any) -> Any:
        known = {ENV_PREFIX + name.upper() for name in cls.model_fields} | LIBRARY_VARIABLES
        unknown = sorted(name for name in os.environ if name.upper().startswith(ENV_PREFIX) and name.upper() not in known)
        if unknown:
            raise ValueError(f"unknown environment variable(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return data

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("the API key is empty: give a key, or unset REPRMERGE_API_KEY to serve without auth")
        return key
