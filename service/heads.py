"""The heads subsystem: the one thread that folds, applies and scores preference heads, and what feeds it.

Everything that runs on the heads thread goes through one priority queue here:
- `apply` (a batch whose backbone pass is done) first: its answers wait only on this;
- folds of heads a batch needs next;
- trade-off losses (/v1/tradeoff) last, so a flood of them never delays a prediction by more
  than the one item running.
A trade-off request is refused at admission with 429 (Retry-After from the queued work) when its
new preferences would take the trade-offs in flight past `heads_queue_limit` or its deadline
would pass first; batch work is always taken (the batcher bounds it: one apply and the fold
chunks of one batch at a time). An item whose deadline passed is dropped before it runs (504). Folds
and trade-offs are cached by preference fingerprint (service.head_cache). Folds run in chunks of at
most `fold_chunk_bytes` of temporaries; a trade-off item holds one preference (batching them gains ~5%:
16 at d = 384 take 226 ms at once, 239 ms one by one), so an apply waits for at most one preference's
losses. A solve that fails fails only the requests that need its preferences.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import partial
from typing import Any, TypeVar

import torch

from reprmerge_core.preference import Preference
from service.engine import Engine, Head, HeadGroup, torch_executor
from service.errors import DeadlineExceeded, QueueFull, ServiceError, Unavailable
from service.head_cache import SolveCache
from service.metrics import Metrics
from service.settings import ServiceSettings

R = TypeVar("R")
log = logging.getLogger("reprmerge.service")


class Priority(IntEnum):
    APPLY = 0
    FOLD = 1
    TRADEOFF = 2


@dataclass(order=True)
class _Item:
    priority: Priority
    seq: int
    work: Callable[[], Any] = field(compare=False)
    deadline: float = field(compare=False)  # time.monotonic()
    future: asyncio.Future[Any] = field(compare=False)


class Heads:
    """Owns the heads thread, its bounded priority queue, the head cache and the trade-off cache."""

    def __init__(self, engine: Engine, settings: ServiceSettings, metrics: Metrics) -> None:
        self._engine, self._metrics = engine, metrics
        self._limit = settings.heads_queue_limit
        self._fail_fingerprint = settings.fail_solve_fingerprint
        self._executor = torch_executor("heads", settings.heads_threads)
        self._queue: list[_Item] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._running: _Item | None = None
        self._seconds = dict.fromkeys(Priority, 0.01)  # running estimates per kind of item: admission, Retry-After
        chunk = engine.fold_chunk(settings.fold_chunk_bytes)
        self.cache: SolveCache[Head] = SolveCache(
            self._fold, settings.head_cache_bytes, lambda head: head.nbytes, chunk=chunk, metrics=metrics)
        self.tradeoffs: SolveCache[tuple[float, ...]] = SolveCache(
            self._tradeoff, settings.tradeoff_cache_entries, lambda _: 1, chunk=1)
        log.info("heads: folds in chunks of %d preferences (%.1f MiB of temporaries at most), trade-offs one "
                 "preference per item (%.1f MiB)", chunk, chunk * engine.folder.fold_bytes_per_preference / 2**20,
                 engine.folder.solver.tradeoff_bytes_per_preference / 2**20)

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="heads")

    async def stop(self) -> None:
        """Answer queued work with 503, stop the worker, then the thread (after the item it runs)."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for item in [*self._queue, *([self._running] if self._running else [])]:
            if not item.future.done():
                item.future.set_exception(Unavailable("the service is shutting down", headers={"Retry-After": "1"}))
        self._queue.clear()
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def drain(self, timeout: float) -> bool:
        """Wait until no work is queued, running or about to be queued; False on timeout."""
        end = time.monotonic() + timeout
        while self._queue or self._running or self.cache.pending or self.tradeoffs.pending:
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.005)
        return True

    @property
    def depth(self) -> int:
        """Work items waiting (not the one running)."""
        return len(self._queue)

    # -- what the rest of the service calls ----------------------------------------------------
    async def get_many(self, prefs: Sequence[Preference], deadline: float) -> dict[str, Head | ServiceError]:
        """Fused heads by fingerprint, from the cache or solved now; a failed solve maps to its error."""
        return await self.cache.get_many(prefs, deadline)

    async def apply(self, z: torch.Tensor, groups: Sequence[HeadGroup]) -> list[torch.Tensor]:
        """`Engine.apply` on the heads thread, ahead of all other work (never refused, never expires)."""
        return await self._submit(Priority.APPLY, partial(self._engine.apply, z, groups), math.inf)

    async def tradeoff(self, prefs: Sequence[Preference], deadline: float) -> list[tuple[float, ...]]:
        """Per-task losses of each preference, in order; raises the first error (429, 504, 500)."""
        self._admit(self.tradeoffs.missing(prefs), deadline)
        found = await self.tradeoffs.get_many(prefs, deadline)
        rows = [found[p.fingerprint] for p in prefs]
        for row in rows:
            if isinstance(row, ServiceError):
                raise row
        return rows  # type: ignore[return-value]

    # -- the queue -----------------------------------------------------------------------------
    async def _fold(self, prefs: list[Preference], deadline: float) -> list[Head]:
        return await self._submit(Priority.FOLD, partial(self._fold_now, prefs), deadline)

    def _fold_now(self, prefs: list[Preference]) -> list[Head]:
        if self._fail_fingerprint is not None and any(p.fingerprint == self._fail_fingerprint for p in prefs):
            raise RuntimeError(f"injected solve failure (fail_solve_fingerprint={self._fail_fingerprint})")
        return self._engine.fold(prefs)

    async def _tradeoff(self, prefs: list[Preference], deadline: float) -> list[tuple[float, ...]]:
        return await self._submit(Priority.TRADEOFF, partial(self._engine.tradeoff, prefs), deadline)

    def _admit(self, new: int, deadline: float) -> None:
        """Refuse (429) `new` trade-off preferences if they overfill the queue or would finish past `deadline`."""
        if new == 0:
            return
        now = time.monotonic()
        if now > deadline:
            self._metrics.rejections.labels("deadline").inc()
            raise DeadlineExceeded("the deadline passed before the request reached the heads thread")
        waiting = self.tradeoffs.pending + new
        ahead = sum(self._seconds[i.priority] for i in self._queue if i.priority is not Priority.TRADEOFF)
        wait = ahead + waiting * self._seconds[Priority.TRADEOFF]
        if waiting > self._limit and self.tradeoffs.pending:  # an idle queue takes any request
            reason = (f"{self.tradeoffs.pending} trade-offs wait for the heads thread, this request adds {new} "
                      f"(limit {self._limit})")
        elif now + wait > deadline:
            reason = f"the heads thread is ~{wait:.2f} s behind, past this request's deadline"
        else:
            return
        self._metrics.rejections.labels("heads_queue_full").inc()
        raise QueueFull(reason, headers={"Retry-After": str(max(1, math.ceil(wait)))})

    async def _submit(self, priority: Priority, work: Callable[[], R], deadline: float) -> R:
        item = _Item(priority, next(self._seq), work, deadline, asyncio.get_running_loop().create_future())
        heapq.heappush(self._queue, item)
        self._metrics.heads_queue_depth.set(len(self._queue))
        self._wakeup.set()
        try:
            return await asyncio.shield(item.future)
        finally:
            if not item.future.done():  # the caller left: the worker skips the item
                item.future.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            item = heapq.heappop(self._queue)
            self._metrics.heads_queue_depth.set(len(self._queue))
            if item.future.done():
                continue
            if time.monotonic() > item.deadline:
                self._metrics.rejections.labels("deadline").inc()
                item.future.set_exception(DeadlineExceeded("the deadline passed while waiting for the heads thread"))
                continue
            start, self._running = time.monotonic(), item
            try:
                result = await loop.run_in_executor(self._executor, item.work)
            except Exception as exc:  # the item's caller gets the error; the worker goes on
                if not item.future.done():
                    item.future.set_exception(exc)
            else:
                if not item.future.done():
                    item.future.set_result(result)
            self._running = None  # left set if the worker is cancelled mid-item: `stop` answers its caller
            self._seconds[item.priority] = 0.8 * self._seconds[item.priority] + 0.2 * (time.monotonic() - start)
