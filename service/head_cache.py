"""Fused heads by canonical preference fingerprint: LRU bounded in bytes, single-flight batched solves.

A miss is a small computation, not a download: concurrent misses on one preference share one
solve, all misses of one lookup are folded together in one batched call, and solving happens on
a dedicated executor (one thread: it also bounds concurrent solves) so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from reprmerge_core.preference import Preference
from service.engine import Head
from service.metrics import Metrics

FoldFn = Callable[[Sequence[Preference]], list[Head]]


class HeadCache:
    """`await get_many(prefs)` returns {fingerprint: Head}; evicts least recently used heads."""

    def __init__(self, fold: FoldFn, budget_bytes: int, executor: Executor, metrics: Metrics) -> None:
        self._fold = fold
        self._budget = budget_bytes
        self._executor = executor
        self._metrics = metrics
        self._entries: OrderedDict[str, Head] = OrderedDict()
        self._pending: dict[str, asyncio.Future[Head]] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, fingerprint: str) -> bool:
        return fingerprint in self._entries

    async def get_many(self, prefs: Sequence[Preference]) -> dict[str, Head]:
        found: dict[str, Head] = {}
        waits: dict[str, asyncio.Future[Head]] = {}
        misses: dict[str, Preference] = {}
        for p in prefs:
            fp = p.fingerprint
            if fp in found or fp in waits or fp in misses:
                continue
            if (head := self._entries.get(fp)) is not None:
                self._entries.move_to_end(fp)
                found[fp] = head
                self._metrics.cache_hits.inc()
                continue
            self._metrics.cache_misses.inc()
            if fp in self._pending:
                waits[fp] = self._pending[fp]
            else:
                misses[fp] = p
        if misses:
            loop = asyncio.get_running_loop()
            futures = {fp: loop.create_future() for fp in misses}
            self._pending.update(futures)
            waits.update(futures)
            # A task of its own: a caller that gives up never leaves other waiters hanging.
            asyncio.ensure_future(self._solve(list(misses.values()), futures))
        for fp, fut in waits.items():
            found[fp] = await asyncio.shield(fut)
        return found

    async def _solve(self, prefs: list[Preference], futures: dict[str, asyncio.Future[Head]]) -> None:
        start = time.perf_counter()
        try:
            heads = await asyncio.get_running_loop().run_in_executor(self._executor, self._fold, prefs)
        except Exception as exc:  # every waiter gets the error; the cache stays unchanged
            for fut in futures.values():
                fut.set_exception(exc)
                fut.add_done_callback(lambda f: f.exception())
            return
        finally:
            for fp in futures:
                self._pending.pop(fp, None)
        self._metrics.solve_duration.observe(time.perf_counter() - start)
        for head in heads:
            self._insert(head)
            futures[head.fingerprint].set_result(head)

    def _insert(self, head: Head) -> None:
        self._entries[head.fingerprint] = head
        self.nbytes += head.nbytes
        while self.nbytes > self._budget and self._entries:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
            self._metrics.cache_evictions.inc()
        self._metrics.cache_entries.set(len(self._entries))
        self._metrics.cache_bytes.set(self.nbytes)
