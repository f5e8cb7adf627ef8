"""The middleware every route passes through, before its handler (and before any response cache):

1. a request id: the client's X-Request-Id when it is a sane token, else a new one, set on the request (so the
   handler echoes it), on every log line (`common/logctx.py`) and on every response;
2. the caller: API keys (`api/auth.py`) on every path but OPEN_PATHS;
3. the body, read once with MAX_BODY_BYTES (413) and BODY_TIMEOUT_S (408, then the connection is closed)
   enforced, refused unless it is UTF-8 JSON (400) sent as JSON (415), and replayed to the handler;
4. what can be refused from the body as plain JSON: sizes, prompts that cannot fit the context, schemas too
   large to compile, token ids (`api/limits.py`), the shape of
   `model`, and a key's model list (a model the key may not use is a 404 exactly like an unknown one);
5. the key's rate limits (`api/ratelimit.py`), whose x-ratelimit-* headers go on the response.

Being an app-level middleware it covers every route, including ones added later, and a handler cannot opt out.
A refusal is answered here, in OpenAI's envelope, before anything is queued.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, cast

import msgspec
from litestar.config.cors import CORSConfig
from litestar.types import ASGIApp, Empty, HTTPScope, Message, Receive, Scope, Send
from litestar.utils.scope.state import ScopeState

from api import aliases, auth, connection, limits
from api.auth import Authenticator, Principal
from api.endpoints import endpoint
from api.errors import APIError
from api.ratelimit import RATE_LIMIT_HEADERS, RateLimiter, estimate_tokens
from api.registry import model_not_found
from common import logctx
from common.settings import Settings, split_list

log = logging.getLogger("axion.api.guard")
BODY_METHODS = ("POST", "PUT", "PATCH")
FORM_PATHS = ("/v1/files",)  # the only routes whose body is not JSON (multipart uploads)


class ClientLeft(Exception):
    """The client disconnected before its body was complete: there is no one to answer."""


def sane_request_id(value: str | None) -> bool:
    return value is not None and 0 < len(value) <= 128 and all(c.isalnum() or c in "._:-" for c in value)


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._auth: Authenticator | None = None
        self._limiter: RateLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id")
        if not sane_request_id(request_id):
            request_id = uuid.uuid4().hex
            scope["headers"] = [*((k, v) for k, v in scope["headers"] if k.lower() != b"x-request-id"),
                                (b"x-request-id", request_id.encode())]
            ScopeState.from_scope(scope).headers = Empty  # parsed already by the CORS middleware, if it is on
        id_token = logctx.request_id.set(request_id)  # type: ignore[arg-type]
        principal_token = auth.current.set(None)
        alias_token = aliases.requested.set(None)
        abort_token = connection.abort.set(connection.abort_from_scope(scope))
        extra: dict[str, str] = {}
        try:
            try:
                body = await self._admit(cast(HTTPScope, scope), receive, headers, extra)
            except ClientLeft:
                return
            except APIError as exc:
                if exc.status in (401, 429, 413, 408):
                    log.info("refused %s %s: %d %s", cast(HTTPScope, scope)["method"], scope["path"], exc.status,
                             exc.code)
                await self._refuse(exc, request_id, extra, send)  # type: ignore[arg-type]
                return
            await self.app(scope, _replay(body, receive) if body is not None else receive,
                           _with_headers(send, extra | {"x-request-id": request_id or ""}))
        finally:
            connection.abort.reset(abort_token)
            aliases.requested.reset(alias_token)
            auth.current.reset(principal_token)
            logctx.request_id.reset(id_token)

    async def _admit(self, scope: HTTPScope, receive: Receive, headers: dict[str, str],
                     extra: dict[str, str]) -> bytes | None:
        """Run checks 2-5; return the body read (None when none was read); raise APIError to refuse."""
        state = scope["litestar_app"].state
        if self._auth is None:
            self._auth = Authenticator(self.settings, state.redis)
            self._limiter = RateLimiter(state.redis)
        path, method = scope["path"], scope["method"]
        if method == "OPTIONS" or self._auth.is_open(path):
            return None
        principal = await self._auth.authenticate(headers.get("authorization"))
        auth.current.set(principal)
        body = None
        if method in BODY_METHODS:
            body = await _read_body(receive, headers, self.settings.max_body_bytes, self.settings.body_timeout_s)
        parsed: Any = None
        if body and path not in FORM_PATHS:
            check_json_content_type(headers.get("content-type", ""))
            parsed = _parse_json(body)
        if isinstance(parsed, dict) and body is not None:
            body = self._resolve_alias(parsed, body)
            body = await self._fill_model(path, parsed, body, principal, state.registry)
            await self._check_body(path, parsed, principal, state.registry)
        if self._limiter is not None and (principal.rpm > 0 or principal.tpm > 0):
            decision = await self._limiter.take(principal, estimate_tokens(path, parsed, self.settings.max_seq_len))
            extra.update(decision.headers)
            if decision.error is not None:
                log.info("rate limited: key %s (%s)", principal.id, decision.error.type)
                metrics = getattr(state, "metrics", None)
                if metrics is not None:
                    metrics.rate_limited.labels(decision.error.type or "unknown").inc()
                raise decision.error
        return body

    def _resolve_alias(self, parsed: dict[str, Any], body: bytes) -> bytes:
        """Replace an alias in `model` by the served model id (`api/aliases.py`) before any check, cache key,
        rate limit or queue sees it; the name sent is remembered for the response."""
        model = parsed.get("model")
        if not isinstance(model, str) or not self.settings.model_aliases:
            return body
        served = aliases.resolve(self.settings.model_aliases, model)
        if served == model:
            return body
        aliases.requested.set((served, model))
        parsed["model"] = served
        return msgspec.json.encode(parsed)

    async def _fill_model(self, path: str, parsed: dict[str, Any], body: bytes, principal: Principal,
                          registry: Any) -> bytes:
        """A model endpoint's body without `model` gets the one model of the endpoint's kind the caller may use,
        as vLLM serves its only model: a live worker's, else (chat) the configured one. None: a 404; several: a
        400 asking to choose."""
        route = endpoint(path)
        kind = route.kind if route is not None else None
        if kind is None or "model" in parsed:  # a null model is the decoder's to refuse
            return body
        served = sorted({w.model for w in await registry.workers() if w.kind == kind and principal.may_use(w.model)})
        if not served and kind == "chat" and principal.may_use(self.settings.model_id):
            served = [self.settings.model_id]
        if not served:
            raise APIError(404, f"No {kind} model is served for {path}; name one in 'model'.", param="model",
                           code="model_not_found")
        if len(served) > 1:
            raise APIError(400, f"'model' is required: {len(served)} {kind} models are served "
                           f"({', '.join(served[:5])}).", param="model", code="missing_required_parameter")
        parsed["model"] = served[0]
        return msgspec.json.encode(parsed)

    async def _check_body(self, path: str, body: dict[str, Any], principal: Principal, registry: Any) -> None:
        limits.check_sizes(body, self.settings)
        limits.check_prompt_length(path, body, self.settings.max_seq_len)
        limits.check_schema_sizes(body)
        model = body.get("model")
        if not isinstance(model, str):
            return
        problem = await registry.model_problem(model, self.settings)
        if problem:
            raise APIError(400, f"Invalid 'model': {problem}", param="model", code="invalid_value")
        if not principal.may_use(model):
            raise model_not_found(model)
        served = endpoint(path)
        kind = served.kind if served is not None else None
        if kind is not None and limits.token_id_fields(path, body):
            sizes = [w.vocab_size for w in await registry.workers() if w.model == model and w.kind == kind]
            if sizes and min(sizes) > 0:
                limits.check_vocabulary(path, body, min(sizes))

    @staticmethod
    async def _refuse(exc: APIError, request_id: str, extra: dict[str, str], send: Send) -> None:
        headers = extra | exc.headers | {"x-request-id": request_id, "content-type": "application/json"}
        body = exc.to_json()
        start: Any = {"type": "http.response.start", "status": exc.status,
                      "headers": [(k.encode(), v.encode()) for k, v in
                                  (headers | {"content-length": str(len(body))}).items()]}
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": False})


def check_json_content_type(content_type: str) -> None:
    """415 for a body sent as anything but JSON (no Content-Type at all is taken as JSON, as curl -d sends)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media in ("", "application/json") or media.endswith("+json"):
        return
    raise APIError(415, f"Send the body as JSON with 'Content-Type: application/json' (got '{media}').",
                   param="Content-Type", code="unsupported_media_type")


def _parse_json(body: bytes) -> Any:
    """The body as plain JSON, or None when it is not JSON (the endpoint's own decoder then says where)."""
    try:
        return msgspec.json.decode(body)
    except UnicodeDecodeError:
        raise APIError(400, "The body is not valid UTF-8.", code="invalid_json") from None
    except msgspec.DecodeError:
        return None
    except RecursionError:
        raise APIError(400, "The JSON body is nested too deeply.", code="invalid_json") from None


async def _read_body(receive: Receive, headers: dict[str, str], limit: int, timeout_s: float) -> bytes:
    """The whole body; a 413 as soon as it (or its Content-Length) is over `limit`, a 408 (and the connection
    closed after it) when it has not all arrived within `timeout_s`."""
    too_large = APIError(413, "Request body too large.", code="request_too_large")
    length = headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    raise ClientLeft
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout_s:g}s.", code="request_timeout",
                       headers={"Connection": "close"}) from None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the already-read body over once, then defers to the real one (disconnects)."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_headers(send: Send, headers: dict[str, str]) -> Send:
    """A `send` that adds `headers` to the response start, leaving those the handler set alone."""
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            present = {k.lower() for k, _ in message.get("headers", [])}
            added = [(k.encode(), v.encode()) for k, v in headers.items() if k.encode() not in present]
            message = cast(Message, {**message, "headers": [*message.get("headers", []), *added]})
        await send(message)

    return wrapped


def cors_config(settings: Settings) -> CORSConfig | None:
    """CORS only when CORS_ALLOW_ORIGINS names origins (`*` for any): browsers may then call the API directly,
    with keys in the Authorization header and the request-id and rate-limit headers readable."""
    origins = split_list(settings.cors_allow_origins)
    if not origins:
        return None
    return CORSConfig(allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                      allow_headers=["authorization", "content-type", "x-request-id"],
                      expose_headers=["x-request-id", "retry-after", *RATE_LIMIT_HEADERS], max_age=600)
