"""FastAPI app factory and the thin /v1 and probe routes; the logic lives in `service.runtime`."""

from __future__ import annotations

import logging
from functools import partial
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response as StarletteResponse
from starlette.types import Scope

from reprmerge_core import __version__
from service import oip, reload
from service.deps import disconnected, get_service, problems, set_timings
from service.engine import Engine
from service.errors import InvalidInput, MalformedRequest, ServiceError, field_of, from_status
from service.metrics import Metrics
from service.middleware import RequestMiddleware, problem_response
from service.runtime import TIMEOUT_HEADER, Service
from service.schemas import InfoResponse, PredictRequest, PredictResponse, TradeoffRequest, TradeoffResponse
from service.settings import ServiceSettings

log = logging.getLogger("reprmerge.service")

DESCRIPTION = """Per-request trade-offs between the tasks of one merged backbone.

Every request names a preference over tasks; its closed-form correction is folded into the task
heads (cached by canonical preference), and requests with different preferences share one
backbone pass. Errors are `application/problem+json` (RFC 9457)."""


def _request_id(request: Request) -> str:
    return request.state.request_id


def install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, leaves as problem+json with the request id."""

    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return problem_response(exc, _request_id(request), request.url.path)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        # The deepest error is the most specific: for `[1, "x"]` against dict | list it is the list
        # element (`preference[1]`), not the dict branch's "Input should be a valid dictionary".
        first = max(exc.errors(), key=lambda e: len(e["loc"]))
        if first["type"] == "json_invalid":
            err: ServiceError = MalformedRequest(f"body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
        else:
            err = InvalidInput(first["msg"], field=field_of(tuple(first["loc"])))
        return problem_response(err, _request_id(request), request.url.path)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        err = from_status(exc.status_code, str(exc.detail))
        err.headers.update(exc.headers or {})  # Allow on a 405
        return problem_response(err, _request_id(request), request.url.path)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s failed", _request_id(request))
        return problem_response(ServiceError("internal error; the server log has details under this request id"),
                                _request_id(request), request.url.path)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


router = APIRouter()
PLAYGROUND = "/playground"
# The page loads nothing from outside the service, and the browser is told to refuse it if it tried.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class PageFiles(StaticFiles):
    """The playground's files (package data `service/playground/`), with PAGE_HEADERS on every answer."""

    async def get_response(self, path: str, scope: Scope) -> StarletteResponse:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response
TimeoutHeader = Header(None, alias=TIMEOUT_HEADER, description="seconds the client will wait; later answers become 504")


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    """The service's front door is the playground page."""
    return RedirectResponse(f"{PLAYGROUND}/")


@router.get("/livez", tags=["probes"], summary="process is alive (never touches the model)")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", tags=["probes"], summary="200 once warmed up and not draining", responses=problems(503))
async def readyz(service: Service = Depends(get_service)) -> dict[str, str]:
    service.require_ready()
    return {"status": "ready"}


@router.get("/metrics", tags=["probes"], summary="Prometheus metrics", response_class=Response)
async def metrics(service: Service = Depends(get_service)) -> Response:
    service.metrics.ready.set(service.ready)
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info", response_model=InfoResponse, tags=["v1"], summary="tasks, labels, limits, versions",
            responses=problems(401))
async def info(service: Service = Depends(get_service)) -> InfoResponse:
    return service.info()


@router.post("/v1/predict", response_model=PredictResponse, tags=["v1"],
             summary="labels and class probabilities per input, task and preference",
             responses=problems(400, 401, 413, 422, 429, 503, 504))
async def predict(
    body: PredictRequest, request: Request, timeout: str | None = TimeoutHeader,
    service: Service = Depends(get_service),
) -> Response:
    deadline = service.deadline(timeout)
    prefs, tasks = service.preferences(body), service.tasks(body.tasks)
    texts = service.check_texts(body.texts, truncate=body.truncate)
    # asked for: solved (or refused) before the backbone runs, from the trade-off cache
    kept = await service.quality_kept(prefs, deadline) if body.quality_kept else None
    result = await service.infer(texts, prefs, deadline, partial(disconnected, request))
    answer = Response(await service.predict_answer(prefs, tasks, result, kept), media_type="application/json")
    set_timings(request, answer, result)
    return answer


@router.post("/v1/tradeoff", response_model=TradeoffResponse, tags=["v1"],
             summary="closed-form per-task loss of a preference, from the statistics alone",
             responses=problems(400, 401, 413, 422, 429, 503, 504))
async def tradeoff(body: TradeoffRequest, timeout: str | None = TimeoutHeader,
                   service: Service = Depends(get_service)) -> TradeoffResponse:
    deadline = service.deadline(timeout)
    return await service.tradeoff(service.preferences(body), deadline)


def document_limits(schema: dict[str, Any], settings: ServiceSettings) -> dict[str, Any]:
    """Put the configured limits into the OpenAPI bodies, so schema-valid requests are not refused.

    The limits are enforced by the service (413 with the field); here they are only documented,
    from the same settings.
    """
    bodies = schema["components"]["schemas"]
    texts = bodies["PredictRequest"]["properties"]["texts"]
    texts["maxItems"], texts["items"]["maxLength"] = settings.max_inputs, settings.max_text_chars
    for name in ("PredictRequest", "TradeoffRequest"):
        body = bodies[name]
        array = next(v for v in body["properties"]["preferences"]["anyOf"] if v.get("type") == "array")
        array["maxItems"] = settings.max_preferences
        body["not"] = {"required": ["preference", "preferences"],
                       "description": "`preference` or `preferences`, not both"}
    return schema


def create_app(settings: ServiceSettings, engine: Engine, metrics: Metrics | None = None) -> FastAPI:
    """The ASGI app serving `engine`; warm-up runs in the lifespan, so the app is ready once started."""
    service = Service(settings, engine, metrics or Metrics())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        service.announce()
        try:
            yield
        finally:
            await app.state.reloader.close()
            current: Service = app.state.service  # a reload may have replaced `service`
            if current.ready:  # after a signal the server has drained already, within drain_timeout
                await current.drain()
            await current.close()

    app = FastAPI(title="reprmerge", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service
    app.state.reloader = reload.Reloader(app.state, settings, service.metrics)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(oip.router)
    app.include_router(reload.router)
    app.mount(PLAYGROUND, PageFiles(packages=[("service", "playground")], html=True), name="playground")
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(RequestMiddleware, metrics=service.metrics, max_body_bytes=settings.max_body_bytes,
                       body_timeout=settings.body_timeout, api_key=api_key,
                       templates=[*(r.path for r in (*router.routes, *oip.router.routes, *reload.router.routes)
                                    if isinstance(r, APIRoute)), f"{PLAYGROUND}/{{path:path}}"])
    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_limits(plain_openapi(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
