"""Typed Python client for the /v1 API, sync and async, on httpx.

Retries 429 and 503 answers (queue full, draining, not ready) honouring Retry-After, at most
`max_retries` times and never sleeping past `max_retry_wait` seconds in total; any other error
raises `ProblemError` carrying the server's problem+json body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from service.schemas import InfoResponse, PredictResponse, TradeoffResponse

RETRY_STATUSES = frozenset({429, 503})
PreferenceArg = Mapping[str, float] | Sequence[float]
Model = TypeVar("Model", bound=BaseModel)


class ProblemError(Exception):
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

    def __init__(self, api_key: str | None, max_retries: int, max_retry_wait: float) -> None:
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_retries, self.max_retry_wait = max_retries, max_retry_wait

    @staticmethod
    def _preference_body(preference: PreferenceArg | None, preferences: Sequence[PreferenceArg] | None) -> dict[str, Any]:
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

    @staticmethod
    def _timeout_headers(timeout: float | None) -> dict[str, str]:
        return {"X-Request-Timeout": f"{timeout:g}"} if timeout is not None else {}

    def _retry_delay(self, response: httpx.Response, attempt: int, waited: float) -> float | None:
        """Seconds to wait before retrying, or None to give up and raise."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        try:
            delay = float(response.headers.get("Retry-After", "1"))
        except ValueError:
            delay = 1.0
        delay = max(0.0, delay)
        return delay if waited + delay <= self.max_retry_wait else None

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
                 max_retry_wait: float = 10.0, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(api_key, max_retries, max_retry_wait)
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=self.headers, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, model: type[Model], **kwargs: Any) -> Model:
        waited, attempt = 0.0, 0
        while True:
            response = self._http.request(method, path, **kwargs)
            delay = self._retry_delay(response, attempt, waited)
            if delay is None:
                return self._parse(response, model)
            time.sleep(delay)
            waited, attempt = waited + delay, attempt + 1

    def predict(self, texts: Sequence[str], preference: PreferenceArg | None = None, *,
                preferences: Sequence[PreferenceArg] | None = None, tasks: Sequence[str] | None = None,
                timeout: float | None = None) -> PredictResponse:
        """Labels and probabilities per input and task; `timeout` is the server-side deadline in seconds."""
        return self._call("POST", "/v1/predict", PredictResponse, json=self._predict_body(texts, preference, preferences, tasks),
                          headers=self._timeout_headers(timeout))

    def info(self) -> InfoResponse:
        return self._call("GET", "/v1/info", InfoResponse)

    def tradeoff(self, preference: PreferenceArg | None = None, *, preferences: Sequence[PreferenceArg] | None = None) -> TradeoffResponse:
        return self._call("POST", "/v1/tradeoff", TradeoffResponse, json=self._preference_body(preference, preferences))


class AsyncClient(_Base):
    """Asynchronous twin of `Client` (same methods, awaited)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 30.0, max_retries: int = 3,
                 max_retry_wait: float = 10.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(api_key, max_retries, max_retry_wait)
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=self.headers, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, model: type[Model], **kwargs: Any) -> Model:
        waited, attempt = 0.0, 0
        while True:
            response = await self._http.request(method, path, **kwargs)
            delay = self._retry_delay(response, attempt, waited)
            if delay is None:
                return self._parse(response, model)
            await asyncio.sleep(delay)
            waited, attempt = waited + delay, attempt + 1

    async def predict(self, texts: Sequence[str], preference: PreferenceArg | None = None, *,
                      preferences: Sequence[PreferenceArg] | None = None, tasks: Sequence[str] | None = None,
                      timeout: float | None = None) -> PredictResponse:
        return await self._call("POST", "/v1/predict", PredictResponse,
                                json=self._predict_body(texts, preference, preferences, tasks), headers=self._timeout_headers(timeout))

    async def info(self) -> InfoResponse:
        return await self._call("GET", "/v1/info", InfoResponse)

    async def tradeoff(self, preference: PreferenceArg | None = None, *,
                       preferences: Sequence[PreferenceArg] | None = None) -> TradeoffResponse:
        return await self._call("POST", "/v1/tradeoff", TradeoffResponse, json=self._preference_body(preference, preferences))
