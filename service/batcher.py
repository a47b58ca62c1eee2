"""Dynamic batching with admission control: one backbone pass answers many requests and preferences.

Admission refuses work the service cannot finish (queue full -> 429 with Retry-After, draining ->
503); the worker drops jobs whose deadline passed or whose caller left before they reach the model
(504). A batch starts as soon as the model is free: it waits up to `max_wait` for more work only
when the previous batch was full, so an idle service adds no latency. Heads missing from the
cache are solved (service.heads) while the backbone encodes the batch; a job whose head could not
be solved gets that error, its batch-mates their answers.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from reprmerge_core.preference import Preference
from service.engine import Engine, Head, HeadGroup
from service.errors import DeadlineExceeded, QueueFull, ServiceError, Unavailable
from service.heads import Heads
from service.metrics import Metrics


@dataclass
class Job:
    """One request: its texts answered under each of its preferences."""

    texts: Sequence[str]
    prefs: Sequence[Preference]
    deadline: float  # time.monotonic()
    future: asyncio.Future[JobResult]
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class JobResult:
    """probabilities[j] is (len(texts), K) under prefs[j]; times in seconds."""

    probabilities: list[torch.Tensor]
    queue_time: float
    inference_time: float


class Batcher:
    """Owns the queue and the single worker that forms batches: backbone on `executor`, heads through `heads`."""

    def __init__(
        self,
        engine: Engine,
        heads: Heads,
        executor: Executor,
        metrics: Metrics,
        *,
        max_batch_size: int,
        max_wait: float,
        queue_limit: int,
    ) -> None:
        self._engine, self._heads, self._metrics = engine, heads, metrics
        self._executor = executor
        self._max_batch, self._max_wait, self._limit = max_batch_size, max_wait, queue_limit
        self._queue: deque[Job] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._unanswered = 0
        self._draining = False
        self._batch_seconds = 0.05  # running estimate, for Retry-After
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, texts: Sequence[str], prefs: Sequence[Preference], deadline: float) -> JobResult:
        """Admit a request and wait for its answer, or refuse it now."""
        if self._draining:
            self._metrics.rejections.labels("draining").inc()
            raise Unavailable("the service is shutting down; retry on another replica", headers={"Retry-After": "1"})
        if len(self._queue) >= self._limit:
            self._metrics.rejections.labels("queue_full").inc()
            raise QueueFull(f"{len(self._queue)} requests are queued (limit {self._limit})",
                            headers={"Retry-After": str(self._retry_after())})
        job = Job(texts, prefs, deadline, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._unanswered += 1
        self._idle.clear()
        self._metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        try:
            return await asyncio.shield(job.future)
        finally:
            if not job.future.done():  # the caller left: the worker skips the job
                job.future.cancel()

    async def drain(self, timeout: float) -> bool:
        """Stop admitting and wait until every admitted job is answered; False on timeout."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _retry_after(self) -> int:
        batches_ahead = len(self._queue) / self._max_batch + 1
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    def _answered(self, job: Job) -> None:
        self._unanswered -= 1
        if self._unanswered == 0:
            self._idle.set()

    async def _next_batch(self, linger: bool) -> list[Job]:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        if linger and self._max_wait > 0 and self._size(self._queue) < self._max_batch:
            await asyncio.sleep(self._max_wait)
        batch, size = [], 0
        while self._queue and (not batch or size + len(self._queue[0].texts) <= self._max_batch):
            job = self._queue.popleft()
            batch.append(job)
            size += len(job.texts)
        self._metrics.queue_depth.set(len(self._queue))
        return batch

    @staticmethod
    def _size(jobs: Sequence[Job]) -> int:
        return sum(len(j.texts) for j in jobs)

    def _admit_to_model(self, batch: list[Job]) -> list[Job]:
        """Jobs still worth running; the others are answered now (504) or dropped (caller left)."""
        now, live = time.monotonic(), []
        for job in batch:
            if job.future.done():
                self._metrics.rejections.labels("client_gone").inc()
                self._answered(job)
            elif now > job.deadline:
                self._metrics.rejections.labels("deadline").inc()
                job.future.set_exception(DeadlineExceeded(f"waited {now - job.enqueued:.3f} s in the queue, past the deadline"))
                self._answered(job)
            else:
                live.append(job)
        return live

    async def _run(self) -> None:
        full = False
        while True:
            batch = self._admit_to_model(await self._next_batch(linger=full))
            full = self._size(batch) >= self._max_batch
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        texts = [t for job in batch for t in job.texts]
        try:
            # The backbone pass and the solves of missing heads run at once, on their own threads.
            z = loop.run_in_executor(self._executor, self._engine.encode, texts)
            heads = await self._heads.get_many([p for job in batch for p in job.prefs], max(j.deadline for j in batch))
            groups, where = self._group(batch, heads)
            probs = await self._heads.apply(await z, groups) if groups else []
        except Exception as exc:  # a failing batch answers its jobs with the error, never kills the worker
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
                self._answered(job)
            return
        elapsed = time.monotonic() - start
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
        self._metrics.inference_duration.observe(elapsed)
        self._metrics.batch_size.observe(len(texts))
        self._metrics.batch_heads.observe(len(groups))
        for job, places in zip(batch, where):
            if places is None:  # answered with its solve's error
                self._answered(job)
                continue
            queue_time = start - job.enqueued
            self._metrics.queue_duration.observe(queue_time)
            if not job.future.done():
                job.future.set_result(JobResult([probs[g][a:b] for g, a, b in places], queue_time, elapsed))
            self._answered(job)

    @staticmethod
    def _group(batch: list[Job], found: dict[str, Head | ServiceError]
               ) -> tuple[list[HeadGroup], list[list[tuple[int, int, int]] | None]]:
        """Rows per distinct head, and for each job and preference its (group, start, end) in that group.

        A job with a preference whose solve failed gets that error now and no places (None).
        """
        heads = {fp: h for fp, h in found.items() if isinstance(h, Head)}
        index: dict[str, int] = {}  # fingerprint -> group, in order of first use
        rows: list[list[int]] = []
        where: list[list[tuple[int, int, int]] | None] = []
        offset = 0
        for job in batch:
            error = next((found[p.fingerprint] for p in job.prefs if p.fingerprint not in heads), None)
            if error is not None:
                if not job.future.done():
                    job.future.set_exception(error)
                where.append(None)
                offset += len(job.texts)
                continue
            places = []
            for p in job.prefs:
                group = index.setdefault(p.fingerprint, len(index))
                if group == len(rows):
                    rows.append([])
                places.append((group, len(rows[group]), len(rows[group]) + len(job.texts)))
                rows[group].extend(range(offset, offset + len(job.texts)))
            where.append(places)
            offset += len(job.texts)
        return [HeadGroup(heads[fp], rows[group]) for fp, group in index.items()], where
