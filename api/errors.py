"""The one place that builds OpenAI error envelopes: `{"error": {"message", "type", "param", "code"}}`.

All four keys are always present and `code` is a string or null, because the official SDKs and LangChain read
them. The status matters as much as the body: the SDK retries 408/409/429/5xx, so a client mistake must never
be answered with a 5xx (it would be sent three times).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:  # the handlers below are Litestar's; the rest is shared with the rq batch runner (no Litestar)
    from litestar import Request, Response
    from litestar.exceptions import HTTPException

log = logging.getLogger("axion.api")

#: Redis failures that mean "Redis is not reachable now" (refused, reset, timed out, still loading its data): the
#: request is answered 503 `redis_unavailable`, which clients retry, never 500.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
#: Retry-After for answers that say "busy, come back": the SDK honours it (and retries 429 and 503 anyway).
RETRY_AFTER_S = {429: "1", 503: "2"}

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_exceeded",
          503: "server_error", 504: "server_error"}


class APIError(Exception):
    """An error for the client, carrying everything the envelope needs."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_json(self) -> bytes:
        return msgspec.json.encode(self.body())


def error_response(err: APIError) -> Response[bytes]:
    from litestar import Response

    headers = err.headers
    if err.status in RETRY_AFTER_S and "Retry-After" not in headers:
        headers = headers | {"Retry-After": RETRY_AFTER_S[err.status]}
    return Response(err.to_json(), status_code=err.status, media_type="application/json", headers=headers)


def redis_unavailable(detail: str = "") -> APIError:
    """503 for a request that needs Redis (the job queue and reply channels) while it cannot be reached."""
    message = "The job queue (Redis) is unreachable; retry shortly."
    return APIError(503, f"{message} {detail}".strip(), code="redis_unavailable", headers={"Retry-After": "2"})


_last_redis_log = 0.0


def handle_redis_down(_: Request, exc: Exception) -> Response[bytes]:
    """A Redis command failed for want of Redis: 503 at once (the client's timeout settings bound how long it
    tried). Logged at most once a second, since during an outage every request lands here."""
    global _last_redis_log
    now = time.monotonic()
    if now - _last_redis_log > 1.0:
        _last_redis_log = now
        log.warning("Redis unreachable (%s: %s); answering 503", type(exc).__name__, exc)
    return error_response(redis_unavailable())


def from_decode_error(exc: msgspec.DecodeError) -> APIError:
    """Turn a msgspec message like "Expected `float` <= 2.0 - at `$.temperature`" into a 400 naming the field."""
    text = str(exc)
    param = None
    if " - at `$." in text:
        text, _, path = text.rpartition(" - at `$.")
        param = path.rstrip("`").replace("[...]", "")
    if text.startswith("Object contains unknown field `"):  # a struct that forbids unknown fields: OpenAI's answer
        field = text.removeprefix("Object contains unknown field `").rstrip("`")
        name = f"{param}.{field}" if param else field
        return APIError(400, f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
    if isinstance(exc, msgspec.ValidationError):
        message = f"Invalid value for '{param}': {text}" if param else text
    else:
        message = f"Malformed JSON body: {text}"
    return APIError(400, message, param=param, code="invalid_value" if param else "invalid_json")


def handle_api_error(_: Request, exc: APIError) -> Response[bytes]:
    return error_response(exc)


def handle_http_exception(_: Request, exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    messages = {404: "Not found: no such route.", 405: "Method not allowed for this route.",
                413: "Request body too large."}
    if status >= 500:
        return error_response(APIError(status, "Internal server error."))
    detail = messages.get(status) or (exc.detail if isinstance(exc.detail, str) else "Bad request.")
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
    return error_response(APIError(status, detail, code=code, headers=dict(exc.headers or {})))


def handle_unexpected(_: Request, exc: Exception) -> Response[bytes]:
    """Last resort: log the trace, answer 500 without it (no stack trace ever reaches a client)."""
    log.exception("unhandled error: %s", type(exc).__name__)
    return error_response(APIError(500, "Internal server error.", code="internal_error"))
