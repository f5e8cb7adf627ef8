"""The Litestar application: routes, lifespan (Redis client, reply hub, registry) and error handling."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis
from litestar import Litestar, Request, Response, delete, get, head, post, route
from litestar.background_tasks import BackgroundTask
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.middleware import DefineMiddleware
from litestar.response import Redirect, Stream

from api import admin, aliases, console, endpoints, errors, protocol, serving_embed, serving_rerank, serving_responses
from api import health as health_views
from api import protocol_legacy as legacy
from api.chat_cache import ChatCache, as_fresh, replay_stream
from api.cluster_hub import create_hub
from api.extension import Extension
from api.guard import RequestGuard, cors_config
from api.jobs import ChatContext, JobRun, new_request_id
from api.metrics import CONTENT_TYPE, Metrics
from api.models_view import model_cards
from api.openapi import openapi_config, openapi_json
from api.registry import WorkerRegistry, model_not_found
from api.serving_chat import ChatRun, chat_messages
from api.serving_completions import CompletionRun
from api.template import template_options
from common import VERSION, redis_client
from common.protocol import ChatJob, SamplingParams, Tokenized
from common.settings import Settings

log = logging.getLogger("axion.api")
T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


def _ctx(state: State) -> ChatContext:
    return state.chat


@post(endpoints.CHAT.routes, status_code=200)
async def chat_completions(request: Request[Any, Any, State], state: State) -> Response[Any]:
    client_id = request.headers.get("x-request-id")
    req = protocol.decode_chat_request(await request.body())
    timeout_s = _request_timeout(request, _ctx(state).settings.request_timeout_s)  # refused before any lease
    request_id = new_request_id(client_id)
    headers = {"X-Request-Id": client_id or request_id}
    cache: ChatCache = state.chat_cache
    decision = await cache.decide(req, request.headers.get("cache-control"))
    headers["x-axion-cache"] = decision.header
    metrics: Metrics = state.metrics
    hit, lease = await cache.read(decision, request_id)
    if hit is not None:
        metrics.cache_hits.labels("chat").inc()
        log.info("request %s model=%s stream=%s cache hit", request_id, req.model, bool(req.stream),
                 extra={"job_id": request_id, "model": req.model, "outcome": "cache hit"})
        headers["x-axion-cache"] = "hit"
        hit = as_fresh(hit, request_id, aliases.shown(req.model))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return Stream(replay_stream(hit, include_usage), media_type="text/event-stream",
                          headers=SSE_HEADERS | headers)
        return Response(msgspec.json.encode(hit), media_type="application/json", headers=headers)
    if decision.read and decision.key:
        metrics.cache_misses.labels("chat").inc()
    save = functools.partial(cache.save, decision.key) if decision.write and decision.key else None
    run = ChatRun(_ctx(state), req, request_id, on_complete=save, lease=lease, timeout_s=timeout_s)
    return await _answer(request, run, headers)


async def _answer(request: Request[Any, Any, State], run: ChatRun | serving_responses.ResponsesRun,
                  headers: dict[str, str]) -> Response[Any]:
    """Start a run, then stream its frames or send its whole answer (either stops when the client leaves)."""
    accepted = await _echoing_request_id(_unless_client_leaves(request, run.start(), run.close), headers)
    if run.streaming:
        return Stream(run.stream(accepted), media_type="text/event-stream", headers=SSE_HEADERS | headers,
                      background=BackgroundTask(run.close))
    answer = await _unless_client_leaves(request, run.complete(accepted), run.close)
    return Response(msgspec.json.encode(answer), media_type="application/json", headers=headers)


def _request_timeout(request: Request[Any, Any, State], cap: float) -> float:
    """`X-Request-Timeout: <seconds>` shortens this request's deadline; REQUEST_TIMEOUT_S is the cap."""
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return cap
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise errors.APIError(400, "X-Request-Timeout must be a positive number of seconds.",
                              param="X-Request-Timeout", code="invalid_value")
    return min(value, cap)


async def _unless_client_leaves(request: Request[Any, Any, State], work: Awaitable[T],
                                close: Callable[[], Awaitable[None]]) -> T:
    """Await a run's start or its whole answer, but give up on it when the client disconnects: the run is
    cancelled before it enqueues (a request still waiting for a slot never reaches a worker), or its `close` flags
    the job and the worker drops it instead of generating for nobody."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await close()  # also when the work was cancelled before it began, and never ran its own clean-up
        raise errors.APIError(499, "The client closed the request.", code="client_closed_request")
    finally:
        watcher.cancel()


@post(endpoints.COMPLETIONS.routes, status_code=200)
async def completions(request: Request[Any, Any, State], state: State) -> Response[Any]:
    client_id = request.headers.get("x-request-id")
    req = legacy.decode_completion_request(await request.body())
    run = CompletionRun(_ctx(state), req, new_request_id(client_id))
    headers = {"X-Request-Id": client_id or run.runs[0].request_id}
    await _echoing_request_id(_unless_client_leaves(request, run.start(), run.close), headers)
    if req.stream:
        return Stream(run.stream(), media_type="text/event-stream", headers=SSE_HEADERS | headers,
                      background=BackgroundTask(run.close))
    completion = await _unless_client_leaves(request, run.complete(), run.close)
    return Response(msgspec.json.encode(completion), media_type="application/json", headers=headers)


async def _echoing_request_id(start: Awaitable[T], headers: dict[str, str]) -> T:
    """Await a run's start; an error raised there carries the X-Request-Id header too."""
    try:
        return await start
    except errors.APIError as exc:
        exc.headers.update(headers)
        raise


@post(endpoints.RESPONSES.routes, status_code=200)
async def create_response(request: Request[Any, Any, State], state: State) -> Response[Any]:
    """OpenAI's Responses API: one chat job, answered as a `response` or as `response.*` events; stored in Redis."""
    client_id = request.headers.get("x-request-id")
    timeout_s = _request_timeout(request, _ctx(state).settings.request_timeout_s)
    run = await serving_responses.prepare(_ctx(state), await request.body(), new_request_id(client_id), timeout_s)
    return await _answer(request, run, {"X-Request-Id": client_id or run.request_id})


@get("/v1/responses/{response_id:str}")
async def retrieve_response(response_id: str, state: State) -> Response[Any]:
    stored = await _response_store(state).load(response_id)
    return Response(msgspec.json.encode(stored.response), media_type="application/json")


@delete("/v1/responses/{response_id:str}", status_code=200)
async def delete_response(response_id: str, state: State) -> Response[Any]:
    deleted = await _response_store(state).delete(response_id)
    return Response(msgspec.json.encode(deleted), media_type="application/json")


def _response_store(state: State) -> serving_responses.ResponseStore:
    ctx = _ctx(state)
    return serving_responses.ResponseStore(ctx.redis, ctx.settings.response_store_ttl_s)


@post(endpoints.TOKENIZE.routes, status_code=200)
async def tokenize(request: Request[Any, Any, State], state: State) -> legacy.TokenizeResponse:
    """vLLM's /tokenize: a raw prompt, or chat messages through the model's template."""
    req = protocol.decode_body(await request.body(), legacy.TokenizeRequest)
    if (req.prompt is None) == (req.messages is None):
        raise errors.APIError(400, "Give exactly one of 'prompt' and 'messages'.", param="prompt",
                              code="invalid_value")
    if req.messages is not None:
        protocol.validate_messages(req.messages)
    messages = chat_messages(req.messages or [])
    job = ChatJob(request_id=new_request_id(request.headers.get("x-request-id")), model=req.model, task="tokenize",
                  messages=messages, prompt=req.prompt, params=SamplingParams(), created=time.time(),
                  tools=msgspec.to_builtins(req.tools) if req.tools else None,
                  add_special_tokens=req.add_special_tokens, **template_options(req))
    answer = await _tokenized(JobRun(_ctx(state), job, stream=False))
    return legacy.TokenizeResponse(len(answer.tokens), answer.max_model_len, answer.tokens)


@post(endpoints.DETOKENIZE.routes, status_code=200)
async def detokenize(request: Request[Any, Any, State], state: State) -> legacy.DetokenizeResponse:
    req = protocol.decode_body(await request.body(), legacy.DetokenizeRequest)
    job = ChatJob(request_id=new_request_id(request.headers.get("x-request-id")), model=req.model,
                  task="detokenize", messages=[], prompt_ids=req.tokens, params=SamplingParams(), created=time.time())
    answer = await _tokenized(JobRun(_ctx(state), job, stream=False))
    return legacy.DetokenizeResponse(answer.text or "")


async def _tokenized(run: JobRun) -> Tokenized:
    """A tokenize or detokenize job's answer."""
    answer = await run.answer()
    if not isinstance(answer, Tokenized):
        raise errors.APIError(500, "Worker answered out of order.", code="internal_error")
    return answer


@post(endpoints.EMBEDDINGS.routes, status_code=200)
async def embeddings(request: Request[Any, Any, State], state: State) -> Response[Any]:
    body, cache = await serving_embed.create_embeddings(_ctx(state), await request.body(),
                                                        request.headers.get("x-request-id"),
                                                        request.headers.get("cache-control"))
    if cache in ("hit", "miss"):
        metrics: Metrics = state.metrics
        (metrics.cache_hits if cache == "hit" else metrics.cache_misses).labels("embed").inc()
    return Response(msgspec.json.encode(body), media_type="application/json", headers={"x-axion-cache": cache})


@post(endpoints.RERANK.routes, status_code=200)
async def rerank(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    """Cohere/Jina-shaped rerank, at the paths vLLM and llama.cpp serve it (`/v2/rerank`: Cohere's v2)."""
    return await serving_rerank.rerank(_ctx(state), await request.body(), request.headers.get("x-request-id"))


@post(endpoints.SCORE.routes, status_code=200)
async def score(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    """vLLM's score API, on the rerank workers."""
    return await serving_rerank.score(_ctx(state), await request.body(), request.headers.get("x-request-id"))


@get(endpoints.VERSION.routes)
async def version() -> dict[str, str]:
    """The server's version, as vLLM answers it."""
    return {"version": VERSION}


@get("/openapi.json", include_in_schema=False)
async def openapi_document(request: Request[Any, Any, State]) -> Response[bytes]:
    """The OpenAPI document where vLLM serves it (also at /schema/openapi.json)."""
    return Response(openapi_json(request), media_type="application/vnd.oai.openapi+json")


@get("/docs", include_in_schema=False)
async def api_docs() -> Redirect:
    """The interactive API page where vLLM serves it."""
    return Redirect("/schema/swagger")


@get("/v1/models")
async def list_models(state: State) -> protocol.ModelList:
    """Every model a live worker serves now, with its kind and backend, and the aliases that point at them."""
    registry: WorkerRegistry = state.registry
    return protocol.ModelList("list", model_cards(await registry.workers(), _ctx(state).settings.model_aliases))


@get("/v1/models/{model_id:path}")
async def retrieve_model(state: State, model_id: str) -> protocol.Model:
    """One model of `/v1/models` (the SDK's `models.retrieve`); ids with slashes are taken whole."""
    registry: WorkerRegistry = state.registry
    wanted = model_id[1:] if model_id.startswith("/") else model_id
    for card in model_cards(await registry.workers(), _ctx(state).settings.model_aliases):
        if card.id in (wanted, model_id):
            return card
    raise model_not_found(wanted)


@get("/health")
async def health(state: State) -> dict[str, Any]:
    """Liveness: always 200 while the process answers, Redis or not; `status` and `reasons` say what is wrong."""
    ctx = _ctx(state)
    return await health_views.liveness(ctx.settings, ctx.redis, ctx.registry, ctx.hub, ctx.open_requests)


@get("/health/ready")
async def health_ready(state: State) -> Response[dict[str, Any]]:
    """Readiness: 200 when this replica can serve its default model now, else 503 with the reasons."""
    ctx = _ctx(state)
    status, body = await health_views.readiness(ctx.settings, ctx.redis, ctx.registry, ctx.hub, ctx.open_requests)
    return Response(body, status_code=status)


@head(["/health", "/health/ready"])
async def health_probe(request: Request[Any, Any, State], state: State) -> Response[None]:
    """HEAD on the health routes, as load balancers probe: the GET's status with no body."""
    if request.url.path != "/health/ready":
        return Response(None, status_code=200)
    ctx = _ctx(state)
    status, _ = await health_views.readiness(ctx.settings, ctx.redis, ctx.registry, ctx.hub, ctx.open_requests)
    return Response(None, status_code=status)


@get("/metrics", media_type=CONTENT_TYPE)
async def metrics_endpoint(state: State) -> Response[bytes]:
    """Prometheus text: this replica's counters and histograms, and the fleet's queues and workers read from
    Redis now (README "Metrics"). Behind the API-key guard unless OPEN_PATHS lists it."""
    ctx = _ctx(state)
    metrics: Metrics = state.metrics
    body = await metrics.render(ctx.redis, ctx.registry, ctx.settings)
    return Response(body, media_type=CONTENT_TYPE)


def options_handlers(handlers: list[HTTPRouteHandler]) -> list[HTTPRouteHandler]:
    """OPTIONS for each path that several handlers serve, its `Allow` listing all their methods: Litestar's own
    lists only the methods of the first handler registered for the path."""
    methods: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for handler in handlers:
        for path in handler.paths:
            methods.setdefault(path, {"OPTIONS"}).update(handler.http_methods)
            counts[path] = counts.get(path, 0) + 1
    return [_allow(path, ", ".join(sorted(methods[path]))) for path in methods if counts[path] > 1]


def _allow(path: str, allow: str) -> HTTPRouteHandler:
    async def options() -> Response[None]:
        return Response(None, status_code=204, headers={"Allow": allow})

    return route(path, http_method=["OPTIONS"], include_in_schema=False, name=f"options {path}")(options)


def create_app(settings: Settings, redis: aioredis.Redis | None = None,
               extensions: Sequence[Extension] = ()) -> Litestar:
    """The API's app, with the routes of `extensions` (the Batch API, handed in by `axion/app.py`)."""
    metrics = Metrics(settings.vllm_metric_names)  # one registry per app: apps in one process do not collide

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        client = redis or redis_client.connect(settings)
        hub = create_hub(client, settings)  # one pub/sub connection, or one per Redis Cluster node
        await hub.start()
        registry = WorkerRegistry(client, default_models=(settings.model_id,), grace_s=settings.worker_grace_s)
        app.state.redis = client
        app.state.registry = registry
        app.state.metrics = metrics
        app.state.chat = ChatContext(settings, client, hub, registry, asyncio.Semaphore(settings.concurrent_requests),
                                     metrics=metrics)
        app.state.chat_cache = ChatCache(app.state.chat)
        try:
            yield
        finally:
            await hub.stop()
            if redis is None:
                await client.aclose()

    handlers = [chat_completions, completions, create_response, retrieve_response, delete_response, tokenize,
                detokenize, embeddings, rerank, score, version, list_models, retrieve_model, openapi_document,
                api_docs, health, health_ready, health_probe, metrics_endpoint, console.console_page,
                console.console_fleet,
                post(endpoints.LOAD_MODEL.routes, status_code=202)(admin.load_model),
                post(endpoints.UNLOAD_MODEL.routes, status_code=202)(admin.unload_model),
                *(handler for ext in extensions for handler in ext.handlers)]
    return Litestar(
        route_handlers=[*options_handlers(handlers), *handlers],  # OPTIONS first: Litestar then adds none
        lifespan=[lifespan],
        request_max_body_size=settings.max_body_bytes,
        middleware=[DefineMiddleware(RequestGuard, settings=settings)],
        cors_config=cors_config(settings),
        exception_handlers={
            errors.APIError: errors.handle_api_error,
            **dict.fromkeys(errors.REDIS_DOWN, errors.handle_redis_down),
            HTTPException: errors.handle_http_exception,
            Exception: errors.handle_unexpected,
        },
        openapi_config=openapi_config(extensions),
        logging_config=None,
    )
