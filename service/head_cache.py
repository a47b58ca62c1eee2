"""Values solved per canonical preference (fused heads, trade-off losses): LRU by cost, single-flight, chunked.

A miss is a small computation, not a download: concurrent misses on one preference share one
solve, the misses of one lookup are solved together in chunks of at most `chunk` preferences (so
one solve's temporaries stay bounded), and every waiter of a solve gets its value or its error,
whatever the solve does: raise, return fewer values than asked, or be dropped at its deadline.
When a chunk's solve raises, its preferences are solved one by one, so only those that fail fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from reprmerge_core.preference import Preference
from service.errors import ServiceError
from service.metrics import Metrics

V = TypeVar("V")
SolveFn = Callable[[list[Preference], float], Awaitable[list[V]]]
log = logging.getLogger("reprmerge.service")


class SolveCache(Generic[V]):
    """`await get_many(prefs, deadline)` gives {fingerprint: value or the error of its solve}.

    `solve(prefs, deadline)` returns one value per preference, in order; `cost(value)` is what a
    value counts against `budget` (bytes of a head, 1 for an entry), least recently used first out.
    `metrics` (the head cache's counters) is optional.
    """

    def __init__(self, solve: SolveFn[V], budget: int, cost: Callable[[V], int], *, chunk: int,
                 metrics: Metrics | None = None) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self._solve_fn, self._budget, self._cost, self.chunk = solve, budget, cost, chunk
        self._metrics = metrics
        self._entries: OrderedDict[str, V] = OrderedDict()
        self._pending: dict[str, asyncio.Future[V]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.cost = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, fingerprint: str) -> bool:
        return fingerprint in self._entries

    @property
    def pending(self) -> int:
        """Preferences being solved (queued or running)."""
        return len(self._pending)

    def missing(self, prefs: Sequence[Preference]) -> int:
        """Preferences that `get_many(prefs)` would start solving now: distinct, neither cached nor pending."""
        return sum(fp not in self._entries and fp not in self._pending for fp in {p.fingerprint for p in prefs})

    async def get_many(self, prefs: Sequence[Preference], deadline: float) -> dict[str, V | ServiceError]:
        """Values of every distinct preference; a failed one maps to its error, the others are unaffected.

        A solve this lookup starts runs under its `deadline`; a lookup that joins a solve already
        under way waits for that solve as it is.
        """
        found: dict[str, V | ServiceError] = {}
        waits: dict[str, asyncio.Future[V]] = {}
        misses: dict[str, Preference] = {}
        for p in prefs:
            fp = p.fingerprint
            if fp in found or fp in waits or fp in misses:
                continue
            if (value := self._entries.get(fp)) is not None:
                self._entries.move_to_end(fp)
                found[fp] = value
                self._count("hit")
                continue
            self._count("miss")
            if fp in self._pending:
                waits[fp] = self._pending[fp]
            else:
                misses[fp] = p
        if misses:
            loop = asyncio.get_running_loop()
            todo = list(misses.values())
            for start in range(0, len(todo), self.chunk):
                part = todo[start:start + self.chunk]
                futures = {p.fingerprint: loop.create_future() for p in part}
                self._pending.update(futures)
                waits.update(futures)
                # A task of its own: a caller that gives up never leaves other waiters hanging.
                task = asyncio.create_task(self._solve(part, futures, deadline))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        for fp, fut in waits.items():
            try:
                found[fp] = await asyncio.shield(fut)
            except ServiceError as exc:
                found[fp] = exc
        return found

    async def _solve(self, prefs: list[Preference], futures: dict[str, asyncio.Future[V]], deadline: float) -> None:
        try:
            await self._settle(prefs, futures, deadline)
        finally:
            for fp in futures:
                self._pending.pop(fp, None)

    async def _settle(self, prefs: list[Preference], futures: dict[str, asyncio.Future[V]], deadline: float) -> None:
        """Solve `prefs` and resolve every one of `futures`: with its value, or with an error."""
        start = time.perf_counter()
        try:
            values = await self._solve_fn(prefs, deadline)
        except ServiceError as exc:  # refused, expired or shutting down: the waiters get it as it is
            self._fail(futures, exc)
            return
        except Exception as exc:
            if len(prefs) > 1:  # one bad preference must not fail its chunk-mates: solve each alone
                log.warning("solving %d preferences failed (%s); solving them one by one", len(prefs), exc)
                await asyncio.gather(*(self._settle([p], {p.fingerprint: futures[p.fingerprint]},
                                                    deadline) for p in prefs))
                return
            log.error("solving preference %s failed", prefs[0].fingerprint, exc_info=exc)
            self._fail(futures, ServiceError(
                f"solving this preference failed ({type(exc).__name__}); the server log has details"))
            return
        if self._metrics is not None:
            self._metrics.solve_duration.observe(time.perf_counter() - start)
        for pref, value in zip(prefs, values, strict=False):  # a short answer is handled below
            self._insert(pref.fingerprint, value)
            futures[pref.fingerprint].set_result(value)
        if len(values) != len(prefs):
            log.error("a solve of %d preferences returned %d values", len(prefs), len(values))
            self._fail(futures,
                       ServiceError("the solve returned no value for this preference; the server log has details"))

    @staticmethod
    def _fail(futures: dict[str, asyncio.Future[V]], exc: ServiceError) -> None:
        for fut in futures.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.add_done_callback(lambda f: f.exception())  # retrieved: no "never retrieved" warning

    def _count(self, event: str) -> None:
        if self._metrics is not None:
            (self._metrics.cache_hits if event == "hit" else self._metrics.cache_misses).inc()

    def _insert(self, fingerprint: str, value: V) -> None:
        self._entries[fingerprint] = value
        self.cost += self._cost(value)
        while self.cost > self._budget and self._entries:
            _, old = self._entries.popitem(last=False)
            self.cost -= self._cost(old)
            if self._metrics is not None:
                self._metrics.cache_evictions.inc()
        if self._metrics is not None:
            self._metrics.cache_entries.set(len(self._entries))
            self._metrics.cache_bytes.set(self.cost)
