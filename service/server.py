"""Running the app under uvicorn with a graceful drain on SIGTERM/SIGINT.

Plain uvicorn closes its socket on the first signal. Here the first signal only starts a drain:
the listener stays open so /readyz can answer 503 and late requests get a 503 problem (with
`Connection: close`, not a refused connection) while every admitted request is answered. The
listener stays open at least `drain_grace` seconds, even when idle, so probes see the 503; then
uvicorn shuts down. Everything, drain, grace, open responses and shutdown, fits in `drain_timeout`
plus about a second. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import resource
import signal
import socket
import time
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from fastapi import FastAPI

from service.app import create_app
from service.engine import Engine
from service.reload import reload_on_signal
from service.settings import ServiceSettings

log = logging.getLogger("reprmerge.service")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the service before shutting down; SIGHUP reloads the bundle."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Future[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGHUP, reload_on_signal, self._app.state.reloader)
        await super().startup(sockets)
        if self.started:  # warmed up and listening: the page works from now on
            print(f"playground: {self.playground_url()}", flush=True)

    def playground_url(self) -> str:
        """The page's URL on the bound port (a wildcard host is shown as loopback, which reaches it too)."""
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/playground/"

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT and not self._captured_signals:  # uvicorn raises it again once shut down, so
            self._captured_signals.append(sig)  # Ctrl-C ends `reprmerge serve` like any command: 130, one line
        if self._drain is not None or self._loop is None or self.should_exit:
            self.force_exit = self.should_exit = True
            return
        # Signal handlers run between bytecodes of the loop's thread: refuse at once (a request already
        # in the loop's ready queue would otherwise still see "ready"), then hand the drain to the loop.
        self._app.state.service.refuse_new_work()
        self._drain = asyncio.run_coroutine_threadsafe(self._drain_then_exit(), self._loop)  # type: ignore[assignment]

    async def _drain_then_exit(self) -> None:
        self._app.state.reloader.refuse()  # a bundle swapped in now would escape the drain
        service = self._app.state.service
        settings, start = service.settings, time.monotonic()
        budget = max(settings.drain_timeout - SHUTDOWN_RESERVE_S, 0.0)
        grace = min(settings.drain_grace, budget)
        log.info("draining: refusing new requests, answering admitted ones; listener open for at least %g s", grace)

        async def drain() -> bool:
            try:
                return await asyncio.wait_for(service.drain(), budget)
            except asyncio.TimeoutError:
                return False

        drained, _ = await asyncio.gather(drain(), asyncio.sleep(grace))
        if not drained:
            log.warning("drain timed out with requests still queued")
        # uvicorn then waits this long for responses being written: what is left of drain_timeout.
        left = settings.drain_timeout - (time.monotonic() - start)
        wait = max(left - SHUTDOWN_RESERVE_S / 2, SHUTDOWN_FLOOR_S)
        self.config.timeout_graceful_shutdown = wait  # type: ignore[assignment]
        self.should_exit = True


# Of drain_timeout, this much is kept for after the drain: uvicorn's wait for responses being
# written (at least SHUTDOWN_FLOOR_S) and closing the batcher and its threads.
SHUTDOWN_RESERVE_S = 1.0
SHUTDOWN_FLOOR_S = 0.2
FD_RESERVE = 64  # descriptors kept for the model files, logs and the listener when capping connections
_REFUSED_RESPONSE = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


class GuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol with a deadline for request headers and a cap on open connections.

    uvicorn has no header timeout (its keep-alive timer runs only between requests), so a client
    dribbling headers, or connecting and sending nothing, held a descriptor forever: 1,000 such
    connections exhausted the open-file limit and every accept() then failed. Here a connection
    whose next request's headers are not complete `header_timeout` seconds after its first bytes
    (or after connecting) is closed, and connections past `max_connections` are answered 503 and
    closed at once. The body has its own deadline in the middleware. Set by `guarded_protocol`.
    """

    header_timeout = 10.0
    max_connections = 1000
    _last_refusal_log = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._timed_cycle: object | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.server_state.connections) >= self.max_connections:
            self._refused = True
            transport.write(_REFUSED_RESPONSE)
            transport.close()
            now = time.monotonic()
            if now - GuardedProtocol._last_refusal_log > 10:
                GuardedProtocol._last_refusal_log = now
                log.warning("refusing connections: %d open, the limit is %d", len(self.server_state.connections),
                            self.max_connections)
            return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of a next request on a kept-alive connection
        super().data_received(data)

    def _arm(self) -> None:
        self._timed_cycle = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.cycle is not self._timed_cycle:  # a new request's headers arrived in time
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


def guarded_protocol(header_timeout: float, max_connections: int) -> type[GuardedProtocol]:
    """The protocol class with the service's limits; connections also stay below the open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft - FD_RESERVE < max_connections:
        max_connections = max(1, soft - FD_RESERVE)
        log.info("open-file limit %d: serving at most %d connections", soft, max_connections)
    return type("Guarded", (GuardedProtocol,), {"header_timeout": header_timeout, "max_connections": max_connections})


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
# Fixed thresholds (the deployments set the same through MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_).
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 64 << 20}


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds at 32 and 64 MiB; no-op off glibc or when the environment sets them.

    Any fixed value stops glibc raising its mmap threshold after large frees: with that dynamic
    threshold a soak grew ~0.6 MB of RSS per new preference (solve temporaries carved from arenas
    that small cached heads then pin). 32 MiB rather than 128 KiB because each backbone pass
    allocates activations of a few MiB: mmapped, every batch page-faults them in afresh (1,370 minor
    faults and +30% CPU per text on tiny); from the arenas they are reused, and the 64 MiB trim
    threshold keeps one pass's worth resident instead of returning it after every batch.
    """
    if any(name in os.environ for name in MALLOC_SETTINGS):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is None or not hasattr(libc, "mallopt"):
            return False
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MALLOC_SETTINGS["MALLOC_MMAP_THRESHOLD_"])
                    and libc.mallopt(M_TRIM_THRESHOLD, MALLOC_SETTINGS["MALLOC_TRIM_THRESHOLD_"]))
    except OSError:
        return False


def freeze_startup_objects() -> int:
    """Move every object alive now (torch, transformers, the bundle: over a million) out of the
    collector's reach; returns how many. Otherwise each full collection walks them all (~0.2-0.5 s
    holding the GIL, the event loop and every worker's Python stalled), and requests held in flight
    at load promote enough objects to trigger one every minute or so."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def serve(settings: ServiceSettings, engine: Engine) -> None:
    """Serve `engine` until a signal; blocks."""
    if tune_malloc():
        log.info("glibc malloc: %s", ", ".join(f"{k}={v}" for k, v in MALLOC_SETTINGS.items()))
    app = create_app(settings, engine)
    if settings.api_key is not None:
        log.info("auth on: every route but probes and /metrics needs `Authorization: Bearer <key>`")
    else:
        log.warning("auth off: no REPRMERGE_API_KEY, anyone who reaches %s:%d can use the API", settings.host, settings.port)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=settings.drain_timeout, timeout_keep_alive=settings.keep_alive,
                            http=guarded_protocol(settings.header_timeout, settings.max_connections))
    log.info("%d startup objects frozen: full garbage collections skip them", freeze_startup_objects())
    DrainingServer(config, app).run()
