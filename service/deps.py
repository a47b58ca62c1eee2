"""What routes share: the injected service, timing headers and the problem responses they document."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response

from service.batcher import JobResult
from service.runtime import TIMEOUT_HEADER, Service
from service.schemas import Problem


async def get_service(request: Request) -> AsyncIterator[Service]:
    """The app's Service, injected with Depends so tests and routes never reach for globals.

    The request keeps the one it got, and is counted as its user until it is answered, even if a
    reload (service.reload) swaps in another bundle meanwhile. `async` on purpose: FastAPI runs a
    plain `def` dependency on its thread pool, a thread hop per request.
    """
    service: Service = request.app.state.service
    with service.held():
        yield service


ServiceDep = Annotated[Service, Depends(get_service)]
"""A route parameter of this type receives the app's Service (FastAPI's `Annotated` form of Depends)."""
TimeoutHeader = Annotated[str | None, Header(alias=TIMEOUT_HEADER,
                                             description="seconds the client will wait; later answers become 504")]
"""The request's X-Request-Timeout, if any (the service's default_timeout applies otherwise)."""


async def disconnected(request: Request) -> None:
    """Resolves when the client hangs up: after the body, the server answers receive() only then."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def set_timings(request: Request, response: Response, result: JobResult) -> None:
    """Server-Timing (and X-* twins) for the client; the same numbers go into the access log."""
    queue_ms, inference_ms = round(result.queue_time * 1e3, 3), round(result.inference_time * 1e3, 3)
    request.state.timings.update(queue_ms=queue_ms, inference_ms=inference_ms)
    response.headers["Server-Timing"] = f"queue;dur={queue_ms}, inference;dur={inference_ms}"
    response.headers["X-Queue-Time"] = f"{result.queue_time:.6f}"
    response.headers["X-Inference-Time"] = f"{result.inference_time:.6f}"


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the given error statuses, all application/problem+json."""
    return {
        status: {"model": Problem,
                 "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
        for status in statuses
    }
