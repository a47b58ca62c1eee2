"""Pure ASGI middleware for what every route shares: request id, API key, body limit, metrics, logs.

Pure ASGI (not BaseHTTPMiddleware) so it adds no task per request and sees the final status.
The body is read here, bounded, and replayed: an oversized body is refused before any parsing.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import random
import re
import time
import zlib
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from starlette.responses import JSONResponse
from starlette.routing import compile_path

from service.errors import (
    MalformedRequest,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
    printable,
)
from service.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Probes and metrics stay reachable without the key (kubelet and Prometheus carry none).
OPEN_PATHS = frozenset({"/livez", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
# The playground page is static and holds no data: it loads without the key, then asks for it and
# sends it on its /v1 calls, which stay protected.
PAGE_PATHS, PAGE_PREFIX = frozenset({"/", "/playground"}), "/playground/"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
# Statuses after which the connection is not reused: a 500 may leave it in any state (uvicorn closes
# it), and a 503 comes while draining, when the server is about to close every connection. Saying
# so lets a client's pool open a fresh connection instead of writing to one the server is closing.
# A 408 comes mid-body: the rest of the body may still arrive and must not be read as a request.
CLOSE_AFTER = frozenset({408, 500, 503})
CLIENT_CLOSED = 499  # status logged for a request whose client left before its body was complete (nginx's code)


class ClientGone(Exception):
    """The connection closed before the whole body arrived: there is no complete request to answer."""
access_log = logging.getLogger("reprmerge.access")
# Request bodies: JSON everywhere (a missing Content-Type is read as JSON), and on /v2 also Triton's
# binary tensor extension; compressed with gzip or deflate (zlib) as tritonclient can send them.
JSON_TYPES = ("application/json",)
V2_TYPES = ("application/json", "application/octet-stream")
ENCODINGS = frozenset({"gzip", "x-gzip", "deflate"})


def problem_response(err: ServiceError, request_id: str, path: str) -> JSONResponse:
    """The one place an error becomes RFC 9457 problem+json.

    On /v2 the body also carries `error` (an RFC 9457 extension member): the Open Inference
    Protocol's error field, which Triton and KServe clients show to their users.
    """
    body = err.problem(request_id)
    if path.startswith("/v2"):
        body["error"] = err.detail
    headers = {**err.headers, "X-Request-ID": request_id}
    if err.status in CLOSE_AFTER:
        headers["Connection"] = "close"
    return JSONResponse(body, status_code=err.status, headers=headers, media_type="application/problem+json")


def _new_request_id() -> str:
    """32 random hex digits, as uuid4().hex, without its os.urandom system call per request: ids
    correlate logs, they are not secrets."""
    return f"{random.getrandbits(128):032x}"


class RequestMiddleware:
    """Wraps every HTTP request; timings set by routes in `scope['state']['timings']` are logged too."""

    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int, body_timeout: float, api_key: str | None,
        templates: Sequence[str] = (),
    ) -> None:
        self.app, self.metrics, self.max_body, self.api_key = app, metrics, max_body_bytes, api_key
        self.body_timeout = body_timeout
        self.templates = [(compile_path(t)[0], t) for t in templates]
        # Memoised per path (bounded): matching every template on every request cost ~20% of the event loop.
        self._template_of = functools.lru_cache(maxsize=1024)(self._match_template)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        client_id = headers.get("x-request-id", "")
        request_id = client_id if _CLIENT_ID.match(client_id) else _new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"], state["timings"] = request_id, {}
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                if not any(k.lower() == b"x-request-id" for k, _ in message["headers"]):
                    message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
                if status in (307, 308):  # Starlette's slash redirect is absolute, built from the Host header
                    message["headers"] = [(k, _relative(v) if k.lower() == b"location" else v)
                                          for k, v in message["headers"]]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            refusal: ServiceError | ClientGone | None = self._refusal(scope["path"], headers)
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH") and self._template(scope) != "unmatched":
                refusal = _media_refusal(scope["path"], headers)  # unknown paths keep their 404
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, refusal = await self._read_body(receive, headers)
                if refusal is None and headers.get("content-encoding", "").strip().lower() in ENCODINGS:
                    body, refusal = self._decompress(body)
                    scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-encoding"]
                receive = _replay(body, receive)
            if isinstance(refusal, ClientGone):
                status = CLIENT_CLOSED
                self.metrics.rejections.labels("client_gone").inc()
            elif refusal is not None:
                self.metrics.rejections.labels(refusal.slug).inc()
                await problem_response(refusal, request_id, scope["path"])(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or self._template(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):  # the line costs more than the check; off at --log-level warning
                access_log.info(json.dumps({
                    "request_id": request_id, "method": scope["method"], "route": route, "status": status,
                    "duration_ms": round(elapsed * 1e3, 3), **state["timings"],
                }))

    def _template(self, scope: Scope) -> str:
        """The route template of a request refused before routing (401, 413, ...), for the metrics."""
        return self._template_of(scope["path"])

    def _match_template(self, path: str) -> str:
        return next((template for regex, template in self.templates if regex.match(path)), "unmatched")

    def _refusal(self, path: str, headers: dict[str, str]) -> ServiceError | None:
        if self.api_key is None or path in OPEN_PATHS or path in PAGE_PATHS or path.startswith(PAGE_PREFIX):
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return None
        return Unauthorized("send the API key as `Authorization: Bearer <key>`", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(
        self, receive: Receive, headers: dict[str, str],
    ) -> tuple[bytes, ServiceError | ClientGone | None]:
        """The whole body within `body_timeout` (408 after), at most `max_body` bytes (413), or ClientGone.

        A disconnect before the last chunk is not the end of the body: a truncated body can still
        be valid JSON (a cut list), and answering it would run the model on what nobody asked.
        """
        too_large = PayloadTooLarge(f"request body is larger than {self.max_body} bytes")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return b"", too_large
        chunks: list[bytes] = []

        async def read() -> ServiceError | ClientGone | None:
            size = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return ClientGone()
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body:
                    return too_large
                if not message.get("more_body", False):
                    return None

        try:
            refusal = await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            refusal = RequestTimeout(f"the request body did not arrive within {self.body_timeout:g} s")
        return (b"", refusal) if refusal is not None else (b"".join(chunks), None)

    def _decompress(self, body: bytes) -> tuple[bytes, ServiceError | None]:
        """A gzip or zlib body, inflated to at most `max_body` bytes: the limit holds for what is parsed."""
        inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)  # 32: gzip or zlib header, detected
        try:
            out = inflater.decompress(body, self.max_body + 1)
        except zlib.error as exc:
            return b"", MalformedRequest(f"the compressed body is corrupt: {exc}")
        if len(out) > self.max_body:
            return b"", PayloadTooLarge(f"the decompressed request body is larger than {self.max_body} bytes")
        if not inflater.eof:
            return b"", MalformedRequest("the compressed body is truncated")
        return out, None


def _media_refusal(path: str, headers: dict[str, str]) -> ServiceError | None:
    """415 for a body the routes cannot read, before it is read."""
    kind = headers.get("content-type", "").partition(";")[0].strip().lower()
    allowed = V2_TYPES if path.startswith("/v2") else JSON_TYPES
    if kind and kind not in allowed and not kind.endswith("+json"):
        return UnsupportedMediaType(
            f"Content-Type {printable(kind, 100)!r} is not accepted here; send {' or '.join(allowed)}")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity" and encoding not in ENCODINGS:
        return UnsupportedMediaType(
            f"Content-Encoding {printable(encoding, 100)!r} is not supported; use gzip or deflate")
    return None


def _relative(location: bytes) -> bytes:
    """`http://any-host/v1/info?x` -> `/v1/info?x`: a redirect never echoes the client's Host header."""
    parts = urlsplit(location.decode("latin-1"))
    return urlunsplit(("", "", parts.path or "/", parts.query, "")).encode("latin-1")


def _replay(body: bytes, upstream: Receive) -> Receive:
    """A receive() that yields the buffered body once, then hands over to the connection (disconnects)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await upstream()

    return receive
