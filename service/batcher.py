"""Dynamic batching with admission control: one backbone pass answers many requests and preferences.

The request path is a pipeline, as in text-embeddings-inference: requests arrive already tokenised
(at admission, on the tokenizer pool), and whenever an inference worker is free the batcher fills a
batch from the queue by a padded-token budget and a text cap and hands it over; while the backbone
runs, the heads of that batch are solved on the heads thread and earlier batches' heads are applied,
so a worker starts its next batch as soon as it is free. Several workers (single-threaded passes on
a CPU) run at once: on a busy CPU, independent passes lose less than one thread team does.

Batches are made of texts, not requests: a request may be split across batches. That keeps every
pass within the token budget (only a single text wider than the budget runs alone over it), fills a
batch's tail with the next request's first texts, and lets workers share a request: when there is less
work than would fill every worker, a batch takes its fair share only (at least `MIN_SHARE` texts),
so a 16-text request on an idle 2-core box takes the time of 8 texts, not 16.

Admission refuses work the service cannot finish: draining -> 503; queue full, or an estimated wait
(queued padded tokens over the measured throughput) past the request's deadline -> 429 with a
Retry-After from the same estimate. The worker drops jobs whose deadline passed (504) or whose
client left (never encoded) before they reach the model.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from reprmerge_core.preference import Preference
from service.engine import Engine, Head, HeadGroup
from service.errors import ClientGone, DeadlineExceeded, QueueFull, ServiceError, Unavailable
from service.heads import Heads
from service.metrics import Metrics

# Fewest texts a batch takes when workers share the queued work: below this a pass's
# fixed cost (~1 ms) outweighs running in parallel.
MIN_SHARE = 4


@dataclass
class Job:
    """One request, tokenised: its texts answered under each of its preferences, in one or more parts."""

    ids: Sequence[Sequence[int]]  # token ids per text, unpadded
    prefs: Sequence[Preference]
    deadline: float  # time.monotonic()
    future: asyncio.Future[JobResult]
    enqueued: float = field(default_factory=time.monotonic)
    taken: int = 0  # texts handed to batches so far (texts [0, taken) are on their way)
    running: int = 0  # parts in batches not finished yet
    queued: bool = True
    started: float | None = None  # when its first part's batch started
    parts: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # first text -> probabilities per preference
    width: int = field(init=False)  # longest text in tokens

    def __post_init__(self) -> None:
        self.width = max(map(len, self.ids), default=1)

    @property
    def padded_tokens(self) -> int:
        return len(self.ids) * self.width

    @property
    def remaining_tokens(self) -> int:
        """Padded tokens still queued (counted at the request's width, as admission estimated them)."""
        return (len(self.ids) - self.taken) * self.width

    def result(self, finished: float) -> JobResult:
        """Its parts' probabilities joined in text order."""
        starts = sorted(self.parts)
        probs = [torch.cat([self.parts[a][j] for a in starts]) if len(starts) > 1 else self.parts[starts[0]][j]
                 for j in range(len(self.prefs))]
        started = self.enqueued if self.started is None else self.started
        return JobResult(probs, started - self.enqueued, finished - started)


@dataclass(frozen=True)
class Part:
    """Texts [start, end) of a job, in one batch."""

    job: Job
    start: int
    end: int

    @property
    def rows(self) -> Sequence[Sequence[int]]:
        return self.job.ids[self.start:self.end]


@dataclass(frozen=True)
class JobResult:
    """probabilities[j] is (len(texts), K) under prefs[j]; times in seconds."""

    probabilities: list[torch.Tensor]
    queue_time: float
    inference_time: float


class Throughput:
    """Backbone seconds per padded token, averaged over recent batches weighted by their size.

    Ratio of two moving sums rather than a mean of ratios, so a burst of tiny batches (dominated by
    fixed overhead) cannot make the service believe it is slow and refuse work it could do.
    """

    def __init__(self, tokens: float, seconds: float, decay: float = 0.9) -> None:
        self._tokens, self._seconds, self._decay = tokens, seconds, decay

    def observe(self, tokens: int, seconds: float) -> None:
        self._tokens = self._decay * self._tokens + tokens
        self._seconds = self._decay * self._seconds + seconds

    def seconds(self, tokens: float) -> float:
        return tokens * self._seconds / max(self._tokens, 1.0)


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
        max_batch_tokens: int,
        workers: int = 1,
        max_wait: float,
        queue_limit: int,
    ) -> None:
        self._engine, self._heads, self._metrics = engine, heads, metrics
        self._executor = executor
        self._max_batch, self._max_tokens = max_batch_size, max_batch_tokens
        self._max_wait, self._limit = max_wait, queue_limit
        self._queue: deque[Job] = deque()
        self._queued_tokens = 0
        self._queued_texts = 0  # texts not yet handed to a batch
        self._running_tokens = 0
        self._running_texts = 0  # texts in batches on the backbone now
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._unanswered = 0
        self._draining = False
        self.throughput = Throughput(tokens=1024, seconds=0.05)  # replaced by measurements from the warm-up on
        self._backbone_free = asyncio.Semaphore(workers)
        self._workers = workers
        self._running = 0  # backbone passes under way
        self._last_done: float | None = None  # when the last pass finished, if the backbone stayed busy since
        # Batches between encoding and answer: bounds the pipeline's memory while every worker runs
        # and one more batch has its heads applied.
        self._in_flight = asyncio.Semaphore(workers + 1)
        self._finishing: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        tasks = [t for t in (self._worker, *self._finishing) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def estimated_wait(self, extra_tokens: int = 0) -> float:
        """Seconds until a job queued now (of `extra_tokens` padded tokens) is answered, from queued work."""
        return self.throughput.seconds(self._running_tokens + self._queued_tokens + extra_tokens)

    async def submit(
        self, ids: Sequence[Sequence[int]], prefs: Sequence[Preference], deadline: float,
        gone: Callable[[], Awaitable[object]] | None = None,
    ) -> JobResult:
        """Admit a tokenised request and wait for its answer, or refuse it now.

        `gone()` resolves when the client disconnects: the job is then dropped before the model
        (counted as `client_gone`) and `ClientGone` is raised.
        """
        if self._draining:
            self._metrics.rejections.labels("draining").inc()
            raise Unavailable("the service is shutting down; retry on another replica",
                              headers={"Retry-After": "1", "Connection": "close"})
        job = Job(ids, prefs, deadline, asyncio.get_running_loop().create_future())
        self._admit(job)
        self._queue.append(job)
        self._queued_tokens += job.padded_tokens
        self._queued_texts += len(job.ids)
        self._unanswered += 1
        self._idle.clear()
        self._metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        watcher = asyncio.ensure_future(gone()) if gone is not None else None
        try:
            if watcher is None:
                return await asyncio.shield(job.future)
            either: set[asyncio.Future[Any]] = {job.future, watcher}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if job.future.done():
                return job.future.result()
            raise ClientGone("the client disconnected before its answer")
        finally:
            if watcher is not None:
                watcher.cancel()
            if not job.future.done():  # the caller left: the worker skips the job
                job.future.cancel()

    def _admit(self, job: Job) -> None:
        """Refuse a job that would wait past its deadline, or any job beyond the queue limit."""
        if len(self._queue) >= self._limit:
            self._metrics.rejections.labels("queue_full").inc()
            raise QueueFull(f"{len(self._queue)} requests are queued (limit {self._limit})",
                            headers={"Retry-After": self._retry_after()})
        if self._queue or self._running_tokens:
            wait, budget = self.estimated_wait(job.padded_tokens), job.deadline - time.monotonic()
            if wait > budget:
                self._metrics.rejections.labels("overloaded").inc()
                raise QueueFull(f"the estimated wait ({wait:.2f} s for the queued work) exceeds this request's "
                                f"deadline ({budget:.2f} s)", headers={"Retry-After": self._retry_after()})

    def _retry_after(self) -> str:
        return str(max(1, math.ceil(self.estimated_wait())))

    async def drain(self, timeout: float) -> bool:
        """Stop admitting and wait until every admitted job is answered; False on timeout."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _answered(self, job: Job) -> None:
        self._unanswered -= 1
        if self._unanswered == 0:
            self._idle.set()

    def _fills_batch(self) -> bool:
        return self._queued_texts >= self._max_batch or self._queued_tokens >= self._max_tokens

    async def _next_batch(self, linger: bool) -> list[Part]:
        """Wait for work, then take live jobs' texts in order while the batch stays within both budgets.

        With less work (queued and on the backbone) than fills every worker, this batch takes its fair
        share only, so the other workers run the rest at the same time, now if idle or as soon as their
        pass ends: on a CPU a text costs about the same in a batch of 8 as of 32, and a request is answered
        when its last text is. Shares below `MIN_SHARE` texts are not worth a pass of their own.
        """
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        if linger and self._max_wait > 0 and not self._fills_batch():
            await asyncio.sleep(self._max_wait)
        cap = self._max_batch
        queued = self._queued_texts
        share = math.ceil((queued + self._running_texts) / self._workers)  # texts on the backbone count too
        if MIN_SHARE <= share < cap and queued - share >= MIN_SHARE:
            cap = share
        batch: list[Part] = []
        texts = width = 0
        now = time.monotonic()
        while self._queue and texts < cap:
            job = self._queue[0]
            if not self._live(job, now):
                self._drop(job)
                continue
            end = job.taken
            while end < len(job.ids) and texts + end - job.taken < cap:
                wider = max(width, len(job.ids[end]))
                if (texts or end > job.taken) and (texts + end - job.taken + 1) * wider > self._max_tokens:
                    break
                width, end = wider, end + 1
            if end == job.taken:
                break
            batch.append(self._take(job, end))
            texts += end - batch[-1].start
            if job.taken < len(job.ids):
                break  # the rest of this job did not fit
        self._metrics.queue_depth.set(len(self._queue))
        return batch

    def _take(self, job: Job, end: int) -> Part:
        """Texts [job.taken, end) of the queue's first job, for a batch; the job leaves the queue once all are taken."""
        part = Part(job, job.taken, end)
        self._queued_tokens -= (end - job.taken) * job.width
        self._queued_texts -= end - job.taken
        job.taken, job.running = end, job.running + 1
        if end == len(job.ids):
            self._queue.popleft()
            job.queued = False
        return part

    def _drop(self, job: Job) -> None:
        """Remove a job (dead, or failed by one of its parts) from the queue."""
        self._queued_tokens -= job.remaining_tokens
        self._queued_texts -= len(job.ids) - job.taken
        self._queue.remove(job)
        job.queued = False
        self._settle(job)

    def _settle(self, job: Job) -> None:
        """Count a job answered once its future is resolved and none of its parts is queued or running."""
        if job.future.done() and not job.queued and job.running == 0:
            self._answered(job)

    def _live(self, job: Job, now: float) -> bool:
        """Whether a job's queued texts are still worth running; else it is answered now (504) or dropped
        (client left, or a part already failed it)."""
        if job.future.cancelled():
            self._metrics.rejections.labels("client_gone").inc()
        elif job.future.done():
            pass
        elif now > job.deadline:
            self._metrics.rejections.labels("deadline").inc()
            waited = now - job.enqueued
            job.future.set_exception(DeadlineExceeded(f"waited {waited:.3f} s in the queue, past the deadline"))
        else:
            return True
        return False

    async def _run(self) -> None:
        full = False
        while True:
            await self._backbone_free.acquire()  # a worker is free: the next batch is formed for it now
            batch = await self._next_batch(linger=full)
            if not batch:
                self._backbone_free.release()
                continue
            rows = [ids for part in batch for ids in part.rows]
            padded = len(rows) * max(map(len, rows))
            full = len(rows) >= self._max_batch or padded >= self._max_tokens
            # Counted as running from now (the next batch's share sees them), until its pass ends.
            self._running_tokens += padded
            self._running_texts += len(rows)
            self._running += 1
            await self._in_flight.acquire()
            task = asyncio.create_task(self._run_batch(batch, rows))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)

    def _encoded(self, padded: int, start: float) -> None:
        """Learn the throughput: while the backbone stays busy, the time since the previous pass finished
        is what this one cost (every serial cost of the worker included); after idle, its own time."""
        now = time.monotonic()
        self.throughput.observe(padded, now - (start if self._last_done is None else self._last_done))
        self._last_done = now if (self._queue or self._running) else None

    async def _run_batch(self, batch: list[Part], rows: list[Sequence[int]]) -> None:
        """Encode on a free inference worker, apply heads, answer; the worker is released right after encoding."""
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        for part in batch:
            if part.job.started is None:
                part.job.started = start
        padded = len(rows) * max(map(len, rows))
        # The heads of this batch are solved on their thread while the backbone encodes it.
        heads = asyncio.ensure_future(self._heads.get_many(
            [p for part in batch for p in part.job.prefs], max(part.job.deadline for part in batch)))
        try:
            try:
                z = await loop.run_in_executor(self._executor, self._engine.embed, rows)
            finally:
                self._running_tokens -= padded
                self._running_texts -= len(rows)
                self._running -= 1
                self._encoded(padded, start)
                self._backbone_free.release()
            groups, where = self._group(batch, await heads)
            probs = await self._heads.apply(z, groups) if groups else []
        except Exception as exc:  # a failing batch answers its jobs with the error, never kills the worker
            if not heads.done():
                heads.cancel()
            elif not heads.cancelled():
                heads.exception()  # retrieved: the batch's error is reported instead
            for part in batch:
                if not part.job.future.done():
                    part.job.future.set_exception(exc)
                self._part_done(part.job)
            return
        finally:
            self._in_flight.release()
        finished = time.monotonic()
        self._metrics.inference_duration.observe(finished - start)
        self._metrics.batch_size.observe(len(rows))
        self._metrics.batch_heads.observe(len(groups))
        for part, places in zip(batch, where, strict=True):
            job = part.job
            if places is not None and not job.future.done():
                job.parts[part.start] = [probs[g][a:b] for g, a, b in places]
                if not job.queued and job.running == 1:
                    self._metrics.queue_duration.observe((job.started or start) - job.enqueued)
                    job.future.set_result(job.result(finished))
            self._part_done(job)

    def _part_done(self, job: Job) -> None:
        """A part of `job` left its batch; a job failed by it (future resolved early) loses its queued texts."""
        job.running -= 1
        if job.future.done() and job.queued:
            self._drop(job)
        else:
            self._settle(job)

    @staticmethod
    def _group(batch: list[Part], found: dict[str, Head | ServiceError]
               ) -> tuple[list[HeadGroup], list[list[tuple[int, int, int]] | None]]:
        """Rows per distinct head, and for each part and preference its (group, start, end) in that group.

        A part with a preference whose solve failed fails its job now (None: no places).
        """
        heads = {fp: h for fp, h in found.items() if isinstance(h, Head)}
        index: dict[str, int] = {}  # fingerprint -> group, in order of first use
        rows: list[list[int]] = []
        where: list[list[tuple[int, int, int]] | None] = []
        offset = 0
        for part in batch:
            n = part.end - part.start
            error = next((e for p in part.job.prefs if isinstance(e := found[p.fingerprint], ServiceError)), None)
            if error is not None:
                if not part.job.future.done():
                    part.job.future.set_exception(error)
                where.append(None)
                offset += n
                continue
            places = []
            for p in part.job.prefs:
                group = index.setdefault(p.fingerprint, len(index))
                if group == len(rows):
                    rows.append([])
                places.append((group, len(rows[group]), len(rows[group]) + n))
                rows[group].extend(range(offset, offset + n))
            where.append(places)
            offset += n
        return [HeadGroup(heads[fp], rows[group]) for fp, group in index.items()], where
