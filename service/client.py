"""Typed Python client for the /v1 API, sync and async, on httpx.

Retries, all bounded:
- 429 and 503 answers (queue full, draining, not ready) honouring Retry-After, with a floor of
  `MIN_RETRY_DELAY` and up to `RETRY_JITTER` of random extra delay (so a crowd refused together does
  not return together), at most `max_retries` times and never sleeping past `max_retry_wait` seconds in total;
- a connection reset, a connection refused or a server that hung up without answering (e.g. a
  keep-alive connection the server closed as the request went out), at most `max_transport_retries`
  times on a new connection. Every route the client calls is a pure function of its body (predict,
  trade-off, info), so a request that may have reached the server is safe to repeat. Timeouts are not
  retried: the deadline is spent.
Deadlines: every predict carries a server-side deadline (`timeout` seconds, X-Request-Timeout), and
the HTTP timeout of that call is the deadline plus `DEADLINE_MARGIN`, so the server gives up (504)
before the client does and never works for a client that left.
Errors: an error answer raises `ProblemError` with the server's problem+json body; a transport failure
that survives its retries raises `TransportFailure` naming the method and URL. Both are `ClientError`s.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from service.schemas import InfoResponse, PredictResponse, TradeoffResponse

RETRY_STATUSES = frozenset({429, 503})
# Transport failures where repeating on a new connection can succeed. Not timeouts: their time is spent.
RETRY_TRANSPORT_ERRORS = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
MIN_RETRY_DELAY = 0.1  # seconds: floor for Retry-After 0, negative or NaN
DEFAULT_RETRY_DELAY = 1.0  # seconds, when Retry-After is missing or unreadable
RETRY_JITTER = 0.25  # up to this fraction of the delay is added at random
DEADLINE_MARGIN = 2.0  # seconds the HTTP timeout exceeds the server deadline: time to send the 504 back
# Idle pooled connections are dropped before uvicorn's keep-alive timeout (5 s) closes them: reusing one
# the server closes at that instant fails (14 of 60 reuses at 4.95-5 s idle with httpx's default 5 s, 0 at 2 s).
KEEPALIVE_EXPIRY = 2.0
PreferenceArg = Mapping[str, float] | Sequence[float]
Model = TypeVar("Model", bound=BaseModel)


class ClientError(Exception):
    """Any failure of a client call: an error answer or a transport failure."""


class TransportFailure(ClientError):
    """No answer from the server: the connection failed, broke or timed out (after the retries allowed)."""

    def __init__(self, method: str, url: str, attempts: int, cause: httpx.TransportError) -> None:
        self.method, self.url, self.attempts, self.cause = method, url, attempts, cause
        super().__init__(f"{method} {url}: {type(cause).__name__}: {str(cause) or 'no detail'} "
                         f"({attempts} attempt{'s' if attempts > 1 else ''})")


def retry_after_seconds(value: str | None) -> float:
    """Seconds to wait from a Retry-After value (delta-seconds or an HTTP date), floored at MIN_RETRY_DELAY."""
    if value is None:
        return DEFAULT_RETRY_DELAY
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (email.utils.parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
        except (TypeError, ValueError):
            return DEFAULT_RETRY_DELAY
    return max(MIN_RETRY_DELAY, seconds) if math.isfinite(seconds) else DEFAULT_RETRY_DELAY


class ProblemError(ClientError):
    """An error answer: `status`, and the RFC 9457 fields of its body (`problem` holds it whole)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.title: str = str(problem.get("title", "HTTP error"))
        self.detail: str = str(problem.get("detail", ""))
        self.field: str | None = problem.get("field")
        self.request_id: str | None = problem.get("request_id")
        super().__init__(f"{status} {self.title}: {self.detail}" + (f" (field {self.field})" if self.field else ""))


class _Base:
    """What both clients share: request bodies, retry decisions and response parsing (no I/O here)."""

    def __init__(self, api_key: str | None, timeout: float, max_retries: int, max_retry_wait: float,
                 max_transport_retries: int) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.max_retries, self.max_retry_wait = max_retries, max_retry_wait
        self.max_transport_retries = max_transport_retries
        self._jitter = random.Random()

    @staticmethod
    def _preference_body(preference: PreferenceArg | None,
                         preferences: Sequence[PreferenceArg] | None) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if preference is not None:
            body["preference"] = dict(preference) if isinstance(preference, Mapping) else list(preference)
        if preferences is not None:
            body["preferences"] = [dict(p) if isinstance(p, Mapping) else list(p) for p in preferences]
        return body

    def _predict_body(self, texts: Sequence[str], preference: PreferenceArg | None,
                      preferences: Sequence[PreferenceArg] | None, tasks: Sequence[str] | None) -> dict[str, Any]:
        body = {"texts": list(texts), **self._preference_body(preference, preferences)}
        return body if tasks is None else {**body, "tasks": list(tasks)}

    def _deadline(self, timeout: float | None) -> tuple[dict[str, str], float]:
        """The server deadline header for `timeout` (default: the client's) and the HTTP timeout that matches it."""
        deadline = self.timeout if timeout is None else timeout
        return {"X-Request-Timeout": f"{deadline:g}"}, deadline + DEADLINE_MARGIN

    def _retry_delay(self, response: httpx.Response, attempt: int, waited: float) -> float | None:
        """Seconds to wait before retrying an error answer, or None to give up and raise."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        delay = retry_after_seconds(response.headers.get("Retry-After")) * (1 + RETRY_JITTER * self._jitter.random())
        return delay if waited + delay <= self.max_retry_wait else None

    def _transport_retry_delay(self, error: httpx.TransportError, method: str, url: str, failures: int) -> float:
        """Seconds to wait before trying again on a new connection; raises TransportFailure when not to."""
        if not isinstance(error, RETRY_TRANSPORT_ERRORS) or failures > self.max_transport_retries:
            raise TransportFailure(method, url, failures, error) from error
        return MIN_RETRY_DELAY * 2 ** (failures - 1) * self._jitter.random()

    @staticmethod
    def _parse(response: httpx.Response, model: type[Model]) -> Model:
        if response.is_success:
            return model.model_validate_json(response.content)
        try:
            problem = response.json()
        except ValueError:
            problem = {"title": response.reason_phrase, "detail": response.text}
        raise ProblemError(response.status_code, problem if isinstance(problem, dict) else {"detail": str(problem)})


class Client(_Base):
    """Synchronous client: `Client("http://host:8000").predict(["text"], {"sst2": 1})`."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 30.0, max_retries: int = 3,
                 max_retry_wait: float = 10.0, max_transport_retries: int = 2,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(api_key, timeout, max_retries, max_retry_wait, max_transport_retries)
        self._http = httpx.Client(base_url=base_url, timeout=timeout + DEADLINE_MARGIN, headers=self.headers,
                                  limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY), transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, model: type[Model], **kwargs: Any) -> Model:
        waited, attempt, failures = 0.0, 0, 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                failures += 1
                url = str(self._http.base_url.join(path))
                time.sleep(self._transport_retry_delay(e, method, url, failures))
                continue
            delay = self._retry_delay(response, attempt, waited)
            if delay is None:
                return self._parse(response, model)
            time.sleep(delay)
            waited, attempt = waited + delay, attempt + 1

    def predict(self, texts: Sequence[str], preference: PreferenceArg | None = None, *,
                preferences: Sequence[PreferenceArg] | None = None, tasks: Sequence[str] | None = None,
                timeout: float | None = None) -> PredictResponse:
        """Labels and probabilities per input and task; `timeout`: server deadline in seconds (default: the
        client's)."""
        headers, http_timeout = self._deadline(timeout)
        body = self._predict_body(texts, preference, preferences, tasks)
        return self._call("POST", "/v1/predict", PredictResponse, json=body, headers=headers, timeout=http_timeout)

    def info(self) -> InfoResponse:
        return self._call("GET", "/v1/info", InfoResponse)

    def tradeoff(self, preference: PreferenceArg | None = None, *,
                 preferences: Sequence[PreferenceArg] | None = None) -> TradeoffResponse:
        return self._call("POST", "/v1/tradeoff", TradeoffResponse, json=self._preference_body(preference, preferences))


class AsyncClient(_Base):
    """Asynchronous twin of `Client` (same methods, awaited)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 30.0, max_retries: int = 3,
                 max_retry_wait: float = 10.0, max_transport_retries: int = 2,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(api_key, timeout, max_retries, max_retry_wait, max_transport_retries)
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout + DEADLINE_MARGIN, headers=self.headers,
                                       limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY), transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, model: type[Model], **kwargs: Any) -> Model:
        waited, attempt, failures = 0.0, 0, 0
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                failures += 1
                url = str(self._http.base_url.join(path))
                await asyncio.sleep(self._transport_retry_delay(e, method, url, failures))
                continue
            delay = self._retry_delay(response, attempt, waited)
            if delay is None:
                return self._parse(response, model)
            await asyncio.sleep(delay)
            waited, attempt = waited + delay, attempt + 1

    async def predict(self, texts: Sequence[str], preference: PreferenceArg | None = None, *,
                      preferences: Sequence[PreferenceArg] | None = None, tasks: Sequence[str] | None = None,
                      timeout: float | None = None) -> PredictResponse:
        headers, http_timeout = self._deadline(timeout)
        body = self._predict_body(texts, preference, preferences, tasks)
        return await self._call("POST", "/v1/predict", PredictResponse, json=body, headers=headers,
                                timeout=http_timeout)

    async def info(self) -> InfoResponse:
        return await self._call("GET", "/v1/info", InfoResponse)

    async def tradeoff(self, preference: PreferenceArg | None = None, *,
                       preferences: Sequence[PreferenceArg] | None = None) -> TradeoffResponse:
        return await self._call("POST", "/v1/tradeoff", TradeoffResponse,
                                json=self._preference_body(preference, preferences))
