"""Service errors and their RFC 9457 problem+json form; the status map follows serving.md."""

from __future__ import annotations

from typing import Any

PROBLEM_TYPE = "https://reprmerge.dev/problems/"
MAX_ECHO_CHARS = 200  # an echoed name (a field) is clipped to this
MAX_DETAIL_CHARS = 1000  # and a detail, which may quote the request, to this


def printable(text: str, limit: int | None = None) -> str:
    """`text` safe to put in a JSON response: lone surrogates become `\\udXXX`, and it is clipped to `limit`.

    Errors echo what the client sent; a surrogate would make the UTF-8 encoder, and so the error
    renderer itself, raise, and a huge key would be sent back whole.
    """
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def field_of(loc: tuple[int | str, ...]) -> str:
    """`('body', 'preference', 'dict[str,float]', 'a')` -> `preference.a`: drop the location and union tags."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "header", "path") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" not in part:
            out += f".{part}" if out else part
    return out or "body"


class ServiceError(Exception):
    """An error with a status and a problem type; raised by logic, rendered by the app."""

    status = 500
    title = "Internal error"
    slug = "internal"

    def __init__(self, detail: str, *, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        detail = printable(detail, MAX_DETAIL_CHARS)
        super().__init__(detail)
        self.detail = detail
        self.field = None if field is None else printable(field, MAX_ECHO_CHARS)
        self.headers = headers or {}

    def problem(self, request_id: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "request_id": request_id,
        }
        if self.field is not None:
            body["field"] = self.field
        return body


class MalformedRequest(ServiceError):
    status, title, slug = 400, "Malformed request", "malformed"


class Unauthorized(ServiceError):
    status, title, slug = 401, "Missing or wrong API key", "unauthorized"


class Forbidden(ServiceError):
    status, title, slug = 403, "Not allowed here", "forbidden"


class NotFound(ServiceError):
    status, title, slug = 404, "Not found", "not-found"


class RequestTimeout(ServiceError):
    status, title, slug = 408, "Request not received in time", "request-timeout"


class Conflict(ServiceError):
    status, title, slug = 409, "Conflicts with work under way", "conflict"


class PayloadTooLarge(ServiceError):
    status, title, slug = 413, "Request too large", "too-large"


class UnsupportedMediaType(ServiceError):
    status, title, slug = 415, "Unsupported content type or encoding", "unsupported-media-type"


class InvalidInput(ServiceError):
    status, title, slug = 422, "Invalid preference or input", "invalid"


class QueueFull(ServiceError):
    status, title, slug = 429, "Too many requests queued", "queue-full"


class Unavailable(ServiceError):
    status, title, slug = 503, "Not ready or draining", "unavailable"


class DeadlineExceeded(ServiceError):
    status, title, slug = 504, "Deadline passed before the model", "deadline"


class ClientGone(ServiceError):
    """The client disconnected first; 499 as in nginx, seen only in logs and metrics."""

    status, title, slug = 499, "Client closed the request", "client-gone"


def from_status(status: int, detail: str) -> ServiceError:
    """The error class for a framework status (404, 405, ...) so every error shares one body."""
    for cls in (MalformedRequest, Unauthorized, NotFound, RequestTimeout, PayloadTooLarge, UnsupportedMediaType,
                InvalidInput, QueueFull, Unavailable, DeadlineExceeded):
        if cls.status == status:
            return cls(detail)
    err = ServiceError(detail)
    err.status, err.title, err.slug = status, "HTTP error", f"http-{status}"
    return err
