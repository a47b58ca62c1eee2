"""The service's logic, independent of HTTP: validation, lifecycle, predictions and trade-offs.

Routes (/v1 and /v2) only translate between their wire format and these methods, so both APIs
share one validation and one batching path.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import Enum

import orjson
import torch

from reprmerge_core import __version__
from reprmerge_core.preference import Preference, PreferenceError, canonical_preference
from service.batcher import Batcher, JobResult
from service.engine import Engine, UntokenizableText, torch_executor
from service.errors import InvalidInput, PayloadTooLarge, ServiceError, Unavailable
from service.heads import Heads
from service.metrics import Metrics
from service.schemas import (
    InfoResponse,
    Limits,
    PreferencesIn,
    TaskLoss,
    TaskMeta,
    TradeoffResponse,
    TradeoffResult,
)
from service.settings import ServiceSettings

log = logging.getLogger("reprmerge.service")
TIMEOUT_HEADER = "X-Request-Timeout"


class State(str, Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


class Service:
    """Owns the engine, the heads subsystem, the batcher and the inference thread."""

    def __init__(self, settings: ServiceSettings, engine: Engine, metrics: Metrics) -> None:
        self.settings, self.engine, self.metrics = settings, engine, metrics
        # Backbone passes on `workers` inference threads; folds, head applies and trade-offs on the heads thread.
        workers = settings.inference_worker_count
        self.inference = torch_executor("inference", settings.inference_thread_count, workers)
        self.heads = Heads(engine, settings, metrics)
        # Tokenising at admission and rendering answers: Python-heavy work kept off the event loop.
        self._codec = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="codec")
        self.batcher = Batcher(
            engine, self.heads, self.inference, metrics, max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens, workers=workers, max_wait=settings.max_batch_wait, queue_limit=settings.queue_limit,
        )
        self.state = State.STARTING
        # Requests holding this service (service.deps.get_service): a replaced bundle is retired only
        # once none is left, so each request finishes on the bundle it started on.
        self.users = 0

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Warm up (one batch, one-hot and uniform heads), then turn ready."""
        self.heads.start()
        self.batcher.start()
        tasks = self.engine.tasks
        one_hots = [self._canonical([1.0 if i == t else 0.0 for i in range(len(tasks))]) for t in range(len(tasks))]
        uniform = self.preference(None)
        deadline = time.monotonic() + 600
        for head in (await self.heads.get_many([*one_hots, uniform], deadline)).values():
            if isinstance(head, ServiceError):
                raise head
        # A full batch of the longest texts: compiles kernels for the real shapes and measures the
        # throughput that admission control estimates waits with.
        warm = " ".join(["warm-up"] * self.engine.backbone.max_length)
        await self.infer([warm] * self.settings.max_batch_size, [uniform], deadline, require_ready=False)
        self.state = State.READY
        log.info("ready: bundle %s on %s", self.engine.bundle_id, self.engine.device)

    def refuse_new_work(self) -> None:
        """From now on probes say 503 and requests are refused; synchronous, so a signal handler can
        call it before any request that arrives after the signal is looked at."""
        self.state = State.DRAINING

    def announce(self, previous: Service | None = None) -> None:
        """Show this service's bundle in `build_info` (an info-style gauge), in place of `previous`'s."""
        if previous is not None:
            self.metrics.build_info.remove(__version__, previous.engine.bundle_id, str(previous.engine.device))
        self.metrics.build_info.labels(__version__, self.engine.bundle_id, str(self.engine.device)).set(1)
        self.metrics.cache_entries.set(len(self.heads.cache))
        self.metrics.cache_bytes.set(self.heads.cache.cost)

    async def drain(self) -> bool:
        """Refuse new work and answer everything admitted; False if `drain_timeout` ran out."""
        self.refuse_new_work()
        end = time.monotonic() + self.settings.drain_timeout
        # Batches first (their heads and applies run on the heads thread), then admitted trade-offs.
        return await self.batcher.drain(self.settings.drain_timeout) and await self.heads.drain(end - time.monotonic())

    async def close(self) -> None:
        await self.batcher.stop()
        self._codec.shutdown(wait=True)
        self.inference.shutdown(wait=True)
        await self.heads.stop()

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    def require_ready(self) -> None:
        if not self.ready:
            raise Unavailable(f"the service is {self.state.value}", headers={"Retry-After": "1"})

    # -- validation ----------------------------------------------------------------------------
    def _canonical(self, value: object, field: str = "preference") -> Preference:
        try:
            return canonical_preference(value, self.engine.tasks, grid=self.settings.preference_grid, field=field)  # type: ignore[arg-type]
        except PreferenceError as exc:
            raise InvalidInput(exc.message, field=exc.field) from exc

    def preferences(self, body: PreferencesIn) -> list[Preference]:
        """Canonical preferences of a request: `preference`, `preferences`, or the uniform one."""
        if body.preference is not None and body.preferences is not None:
            raise InvalidInput("give `preference` or `preferences`, not both", field="preferences")
        if body.preferences is not None:
            if len(body.preferences) > self.settings.max_preferences:
                raise PayloadTooLarge(f"{len(body.preferences)} preferences, at most {self.settings.max_preferences}")
            return [self._canonical(v, f"preferences[{i}]") for i, v in enumerate(body.preferences)]
        return [self.preference(body.preference)]

    def preference(self, value: object | None, field: str = "preference") -> Preference:
        """One canonical preference from any JSON value; None means uniform (every task alike)."""
        return self._canonical([1.0] * len(self.engine.tasks) if value is None else value, field)

    def check_texts(self, texts: Sequence[str], field: str = "texts", *, truncate: bool = False,
                    truncate_field: str = "truncate") -> list[str]:
        """The texts to run: a text over `max_text_chars` is refused (413 naming it), or with `truncate` cut to
        that length, as text-embeddings-inference does: the backbone reads only its first `max_length` tokens,
        which lie far inside the limit, so the answer is the whole text's."""
        s = self.settings
        if len(texts) > s.max_inputs:
            raise PayloadTooLarge(f"{len(texts)} inputs, at most {s.max_inputs} per request", field=field)
        if truncate:
            return [text[:s.max_text_chars] for text in texts]
        for i, text in enumerate(texts):
            if len(text) > s.max_text_chars:
                raise PayloadTooLarge(f"input {i} has {len(text)} characters, at most {s.max_text_chars}; set "
                                      f"`{truncate_field}` to true to cut it to that length", field=f"{field}[{i}]")
        return list(texts)

    def tasks(self, names: Sequence[str] | None, field: str = "tasks") -> list[str]:
        if names is None:
            return list(self.engine.tasks)
        for i, name in enumerate(names):
            if name not in self.engine.labels:
                raise InvalidInput(f"unknown task {name!r}; known tasks: {', '.join(self.engine.tasks)}", field=f"{field}[{i}]")
        return list(dict.fromkeys(names))

    def deadline(self, header: str | None) -> float:
        """Monotonic deadline from the client's timeout header (seconds), else the default."""
        timeout = self.settings.default_timeout
        if header is not None:
            try:
                timeout = float(header)
            except ValueError:
                timeout = math.nan
            if not (math.isfinite(timeout) and timeout > 0):
                raise InvalidInput(f"must be a positive number of seconds, got {header!r}", field=f"header.{TIMEOUT_HEADER}")
        return time.monotonic() + timeout

    # -- answers -------------------------------------------------------------------------------
    async def infer(
        self, texts: Sequence[str], prefs: Sequence[Preference], deadline: float,
        gone: Callable[[], Awaitable[object]] | None = None, *, require_ready: bool = True, field: str = "texts",
    ) -> JobResult:
        """Tokenise off the event loop, then batch; `gone()` resolves if the client disconnects."""
        if require_ready:
            self.require_ready()
        try:
            if sum(map(len, texts)) <= self.settings.inline_codec_chars:
                ids = self.engine.token_ids(texts)
            else:
                ids = await asyncio.get_running_loop().run_in_executor(self._codec, self.engine.token_ids, texts)
        except UntokenizableText as exc:
            raise InvalidInput(f"cannot be tokenised (e.g. a lone UTF-16 surrogate): {exc.__cause__}",
                               field=f"{field}[{exc.index}]") from exc
        return await self.batcher.submit(ids, prefs, deadline, gone)

    async def quality_kept(self, prefs: Sequence[Preference], deadline: float) -> list[tuple[float, ...]]:
        """Each preference's `quality_kept` per task (bundle order), from the trade-off cache: a new preference
        costs one closed-form trade-off on the heads thread, with its admission (429) and deadline."""
        return self.engine.quality_kept(await self.heads.tradeoff(prefs, deadline))

    async def predict_answer(self, prefs: Sequence[Preference], tasks: Sequence[str], result: JobResult,
                             kept: Sequence[tuple[float, ...]] | None = None) -> bytes:
        """`predict_body`, rendered on the codec threads unless it is small (`inline_codec_chars` counts
        each task prediction as ~100 characters): the event loop keeps accepting requests."""
        if 100 * len(tasks) * sum(len(p) for p in result.probabilities) <= self.settings.inline_codec_chars:
            return self.predict_body(prefs, tasks, result, kept)
        return await asyncio.get_running_loop().run_in_executor(
            self._codec, self.predict_body, prefs, tasks, result, kept)

    def predict_body(self, prefs: Sequence[Preference], tasks: Sequence[str], result: JobResult,
                     kept: Sequence[tuple[float, ...]] | None = None) -> bytes:
        """The /v1/predict answer (a `PredictResponse`) as JSON bytes, from plain dicts: per-row models
        would cost more than the backbone at small batches. `quality_kept` only where `kept` is given."""
        labels, slices, index = self.engine.labels, self.engine.slices, {t: i for i, t in enumerate(self.engine.tasks)}
        results = []
        for j, (pref, probs) in enumerate(zip(prefs, result.probabilities)):
            predictions = []
            for row in probs.tolist():
                answer = {}
                for t in tasks:
                    scores = row[slices[t]]
                    best = max(range(len(scores)), key=scores.__getitem__)
                    answer[t] = {"label": labels[t][best], "probabilities": dict(zip(labels[t], scores))}
                predictions.append(answer)
            result_j: dict[str, object] = {"preference": pref.as_dict(), "fingerprint": pref.fingerprint}
            if kept is not None:
                result_j["quality_kept"] = {t: kept[j][index[t]] for t in tasks}
            results.append({**result_j, "predictions": predictions})
        return orjson.dumps({"bundle_id": self.engine.bundle_id, "results": results})

    async def tradeoff(self, prefs: Sequence[Preference], deadline: float) -> TradeoffResponse:
        self.require_ready()
        engine = self.engine
        losses = await self.heads.tradeoff(prefs, deadline)
        return TradeoffResponse(bundle_id=engine.bundle_id, results=[
            TradeoffResult(preference=p.as_dict(), fingerprint=p.fingerprint, tasks={
                t: TaskLoss(loss=loss, best=best, uncorrected=uncorrected, quality_kept=kept)
                for t, loss, best, uncorrected, kept in zip(engine.tasks, row, engine.best_loss, engine.uncorrected_loss,
                                                            kept_row)
            }) for p, row, kept_row in zip(prefs, losses, engine.quality_kept(losses))
        ])

    def info(self) -> InfoResponse:
        s, m = self.settings, self.engine.bundle.manifest
        return InfoResponse(
            bundle_id=m.bundle_id, model_name=s.model_name,
            tasks=[TaskMeta(name=t.name, labels=t.labels) for t in m.tasks],
            representation_dim=m.representation_dim, device=str(self.engine.device),
            merge=m.merge.model_dump(mode="json"), correction=m.correction.model_dump(mode="json"),
            limits=Limits(
                max_body_bytes=s.max_body_bytes, max_inputs=s.max_inputs, max_text_chars=s.max_text_chars,
                max_preferences=s.max_preferences, max_batch_size=s.max_batch_size, queue_limit=s.queue_limit,
                preference_grid=s.preference_grid, default_timeout_s=s.default_timeout,
            ),
            versions={"reprmerge": __version__, "bundle_format": str(m.format_version),
                      "bundle_library": m.library_version, "torch": torch.__version__},
        )
