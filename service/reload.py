"""Swapping the served bundle without downtime: `POST /admin/reload` or SIGHUP (service.server).

The new bundle becomes a whole new `Service` (engine, heads thread and caches, batcher), loaded,
validated (hashes and contents, reprmerge_core.bundle; the trace checked against eager) and warmed
up (Service.start) while the current one keeps serving; then one assignment of `app.state.service`
swaps them. A request keeps the service it got (service.deps.get_service) until it is answered,
so a batch, a head cache and an answer always belong to one bundle, and the answer names it
(`bundle_id`). The replaced service is retired once no request holds it. A bundle that fails to
load, validate or warm up is refused, its reason logged and returned, and the current one keeps
serving. One reload at a time: another asked meanwhile is refused (409).

The route needs the API key; with auth off it answers 403 unless `admin_without_auth` is set,
as anyone who reaches the port could otherwise make the service load any directory it can read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.datastructures import State

from service.deps import problems
from service.engine import Engine
from service.errors import Conflict, Forbidden, InvalidInput, ServiceError, Unavailable
from service.metrics import Metrics
from service.runtime import Service
from service.schemas import ReloadRequest, ReloadResponse
from service.settings import ServiceSettings

log = logging.getLogger("reprmerge.service")


class Reloader:
    """Loads bundles into new services next to the one in `state.service`, swaps them in, retires the old."""

    def __init__(self, state: State, settings: ServiceSettings, metrics: Metrics) -> None:
        self._state, self.settings, self._metrics = state, settings, metrics
        self._task: asyncio.Task[ReloadResponse] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self, bundle: Path | None = None) -> asyncio.Task[ReloadResponse]:
        """Begin loading `bundle` (default: the configured path) in the background; 409 if a reload runs."""
        if self._closed:
            raise Unavailable("the service is shutting down", headers={"Retry-After": "1"})
        if self._task is not None and not self._task.done():
            self._metrics.reloads.labels("busy").inc()
            raise Conflict("a reload is under way; retry when it is done", headers={"Retry-After": "5"})
        self._task = asyncio.create_task(self._reload(bundle or self.settings.bundle), name="reload")
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: a caller may be gone
        return self._task

    async def close(self) -> None:
        """Refuse further reloads, then wait for the one under way and for every retiring service."""
        self._closed = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._retiring, return_exceptions=True)

    def refuse(self) -> None:
        """Refuse reloads from now on (the server drains); a load under way is then discarded, not swapped in."""
        self._closed = True

    async def _reload(self, path: Path) -> ReloadResponse:
        start, old = time.monotonic(), self._state.service
        log.info("reload: loading %s while bundle %s serves", path, old.engine.bundle_id)
        try:
            new = await self._load(path)
        except Exception as exc:  # any failure of a new bundle is its refusal; the old one serves on
            self._metrics.reloads.labels("failed").inc()
            log.error("reload: refused %s, still serving bundle %s: %s", path, old.engine.bundle_id, exc)
            raise InvalidInput(f"bundle {path} refused, still serving {old.engine.bundle_id}: {exc}",
                               field="bundle") from exc
        if self._closed:
            await new.close()
            raise Unavailable("the service began shutting down during the reload", headers={"Retry-After": "1"})
        old = self._state.service
        self._state.service = new
        new.announce(old)
        self._metrics.reloads.labels("swapped").inc()
        seconds = time.monotonic() - start
        log.info("reload: now serving bundle %s from %s (was %s), loaded and warmed in %.2f s",
                 new.engine.bundle_id, path, old.engine.bundle_id, seconds)
        task = asyncio.create_task(self._retire(old), name="retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return ReloadResponse(bundle_id=new.engine.bundle_id, previous_bundle_id=old.engine.bundle_id,
                              bundle=str(path), load_seconds=round(seconds, 3))

    async def _load(self, path: Path) -> Service:
        """A started (warmed-up) service on the bundle at `path`; the current one is untouched."""
        s = self.settings
        engine = await asyncio.to_thread(Engine.load, path, device=s.device, solve_dtype=s.solve_dtype,
                                         trace=s.trace_backbone)
        service = Service(s.model_copy(update={"bundle": path}), engine, self._metrics)
        try:
            await service.start()
        except BaseException:
            await service.close()
            raise
        return service

    async def _retire(self, old: Service) -> None:
        """Stop `old` once no request holds it: waits at most default_timeout + drain_timeout, then drains."""
        if not await old.wait_unused(old.settings.default_timeout + old.settings.drain_timeout):
            log.warning("reload: %d requests still hold bundle %s; draining it", old.users, old.engine.bundle_id)
        if not await old.drain():
            log.warning("reload: bundle %s did not drain in time", old.engine.bundle_id)
        await old.close()
        log.info("reload: bundle %s retired", old.engine.bundle_id)


router = APIRouter()


@router.post("/admin/reload", response_model=ReloadResponse, tags=["admin"],
             summary="load, validate and warm a bundle while the current one serves, then swap atomically",
             responses=problems(401, 403, 409, 422, 503))
async def reload(request: Request, body: ReloadRequest | None = None) -> ReloadResponse:
    """Answers once the new bundle serves (200), or with the reason it was refused (422; the old one serves on)."""
    reloader: Reloader = request.app.state.reloader
    if reloader.settings.api_key is None and not reloader.settings.admin_without_auth:
        raise Forbidden("auth is off: set REPRMERGE_API_KEY to use /admin routes (or REPRMERGE_ADMIN_WITHOUT_AUTH=true "
                        "where only trusted clients reach the port)")
    bundle = Path(body.bundle) if body is not None and body.bundle is not None else None
    return await asyncio.shield(reloader.start(bundle))


def reload_on_signal(reloader: Reloader) -> None:
    """SIGHUP: reload the configured bundle path (e.g. a symlink the publisher has flipped); outcome in the log."""
    try:
        reloader.start()
    except ServiceError as exc:
        log.warning("SIGHUP: no reload: %s", exc.detail)
