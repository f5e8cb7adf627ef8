"""Property tests (hypothesis) of the validators and the security helpers, without a server.

The rate limiter's Lua script runs on a real redis-server (fakeredis has no Lua without extra packages).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api import limits, protocol
from api import protocol_legacy as legacy
from api.auth import Principal
from api.endpoints import REQUEST_BODIES
from api.errors import APIError
from api.ratelimit import RateLimiter, estimate_tokens, format_reset
from api.registry import WorkerRegistry
from api.serving_embed import EmbeddingRequest
from api.serving_rerank import RerankRequest
from common import keys
from common.model_ids import load_problem, model_id_problem
from common.protocol import WorkerInfo, encode
from common.redis_server import EmbeddedRedis
from common.settings import load_settings

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2),
    "n": (1, 128), "top_logprobs": (0, 20),
}
INT_FIELDS = {"n", "top_logprobs"}
numbers = st.one_of(st.integers(-1000, 1000), st.floats(-1000, 1000, allow_nan=False))


def chat_body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


@FAST
@given(field=st.sampled_from(sorted(RANGES)), value=numbers)
def test_numeric_ranges_match_openai(field: str, value: float) -> None:
    """In range (and of the right type, where 3.0 is the integer 3 as in JSON Schema): accepted; otherwise a 400
    whose `param` is the field."""
    low, high = RANGES[field]
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    well_typed = isinstance(value, int) or field not in INT_FIELDS or value.is_integer()
    try:
        req = protocol.decode_chat_request(chat_body(**{field: value}, **extra))
    except APIError as exc:
        assert exc.status == 400 and exc.param == field
        assert not (well_typed and low <= value <= high)
    else:
        assert well_typed and low <= value <= high and getattr(req, field) == value


@FAST
@given(stops=st.lists(st.text(min_size=1, max_size=5), max_size=8))
def test_at_most_four_stop_sequences(stops: list[str]) -> None:
    try:
        protocol.decode_chat_request(chat_body(stop=stops))
    except APIError as exc:
        assert exc.param == "stop" and len(stops) > 4
    else:
        assert len(stops) <= 4


message = st.fixed_dictionaries({"role": st.sampled_from([*protocol.ROLES, "wizard", "function", ""]),
                                 "content": st.one_of(st.none(), st.text(max_size=5), st.lists(
                                     st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"])},
                                                           optional={"text": st.text(max_size=5)}), max_size=2))},
                                optional={"tool_call_id": st.just("call_1")})


@FAST
@given(messages=st.lists(message, max_size=4))
def test_messages_need_valid_roles_and_content(messages: list[dict[str, Any]]) -> None:
    def valid(m: dict[str, Any]) -> bool:
        content = m["content"]
        parts_ok = not isinstance(content, list) or all(p["type"] == "text" and "text" in p for p in content)
        return (m["role"] in protocol.ROLES and content is not None and parts_ok
                and (m["role"] != "tool" or "tool_call_id" in m))

    try:
        protocol.decode_chat_request(json.dumps({"model": "m", "messages": messages}).encode())
    except APIError as exc:
        assert exc.status == 400 and exc.param is not None and exc.param.startswith("messages")
        assert not messages or not all(valid(m) for m in messages)
    else:
        assert messages and all(valid(m) for m in messages)


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                     st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                  lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                      st.sampled_from(["model", "messages", "prompt", "input", "tokens", "query",
                                                       "documents", "role", "content", "n", "stop"]), inner,
                                      max_size=4), max_leaves=12).map(lambda v: json.dumps(v).encode())),
       kind=st.sampled_from(sorted(set(REQUEST_BODIES.values()), key=lambda t: t.__name__)))
def test_any_body_decodes_or_is_a_400(raw: bytes, kind: type) -> None:
    """No input makes a decoder raise anything but a 400 APIError (a 500 would be retried by the SDKs)."""
    decoders = {protocol.ChatCompletionRequest: protocol.decode_chat_request,
                legacy.CompletionRequest: legacy.decode_completion_request}
    try:
        decoders.get(kind, lambda b: protocol.decode_body(b, kind))(raw)
    except APIError as exc:
        assert exc.status == 400 and exc.code is not None


def test_deep_nesting_is_a_400_not_a_500() -> None:
    deep = b'{"model": "m", "messages": [], "functions": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(APIError) as info:
        protocol.decode_chat_request(deep)
    assert info.value.status == 400


segment = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=8)


@FAST
@given(name=st.one_of(st.text(max_size=30), st.lists(segment, min_size=1, max_size=4).map("/".join),
                      st.lists(segment, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s))),
       allow_paths=st.booleans())
def test_model_ids_have_hub_shapes(name: str, allow_paths: bool) -> None:
    problem = model_id_problem(name, allow_paths=allow_paths)
    parts = name.lstrip("/").split("/") if name.startswith("/") else name.split("/")
    ok = (0 < len(name) <= 256 and all(c.isascii() and (c.isalnum() or c in "._/-") for c in name)
          and (allow_paths or not name.startswith("/")) and not any(p in ("", ".", "..") for p in parts))
    assert (problem is None) == ok


def test_model_allowlist_and_traversal() -> None:
    assert load_problem("Qwen/Qwen2.5-0.5B-Instruct", allow_paths=False, patterns=["Qwen/*"]) is None
    assert "MODEL_ALLOWLIST" in (load_problem("evil/model", allow_paths=False, patterns=["Qwen/*"]) or "")
    assert load_problem("../secrets", allow_paths=True, patterns=[]) is not None
    assert load_problem("/models/a/../../etc", allow_paths=True, patterns=[]) is not None
    assert load_problem("/models/tiny", allow_paths=False, patterns=[]) is not None
    assert load_problem("/models/tiny", allow_paths=True, patterns=["/models/*"]) is None


@FAST
@given(count=st.integers(0, 40), length=st.integers(0, 60), where=st.sampled_from(["messages", "input", "documents"]))
def test_sizes_are_capped_before_queueing(count: int, length: int, where: str) -> None:
    s = load_settings({"MAX_MESSAGES": "20", "MAX_INPUTS": "30", "MAX_STRING_CHARS": "50"})
    item: Any = {"role": "user", "content": "x" * length} if where == "messages" else "x" * length
    body = {"model": "m", where: [item] * count}
    cap = 20 if where == "messages" else 30
    try:
        limits.check_sizes(body, s)
    except APIError as exc:
        assert exc.status == 400
        if count > cap:
            assert exc.param == where
        else:
            assert length > 50 and count > 0
            assert exc.param == (f"{where}[{count - 1}].content" if where == "messages" else f"{where}[{count - 1}]")
    else:
        assert count <= cap and (length <= 50 or count == 0)


@FAST
@given(ids=st.lists(st.integers(-5, 600), min_size=1, max_size=6), path=st.sampled_from(
    ["/v1/completions", "/detokenize", "/v1/embeddings"]))
def test_token_ids_must_be_in_the_vocabulary(ids: list[int], path: str) -> None:
    field = {"/v1/completions": "prompt", "/detokenize": "tokens", "/v1/embeddings": "input"}[path]
    try:
        limits.check_vocabulary(path, {"model": "m", field: [ids]}, 512)
    except APIError as exc:
        assert exc.param == f"{field}[0]" and any(i >= 512 for i in ids)
    else:
        assert all(i < 512 for i in ids)
    with pytest.raises(APIError) as info:
        limits.check_vocabulary("/v1/chat/completions", {"logit_bias": {"512": 1}}, 512)
    assert info.value.param == "logit_bias"


@FAST
@given(chars=st.integers(0, 4000), max_tokens=st.one_of(st.none(), st.integers(1, 500)), n=st.integers(1, 4))
def test_token_estimate_counts_prompt_and_the_most_output(chars: int, max_tokens: int | None, n: int) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "x" * chars}], "n": n}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    prompt = math.ceil(chars / 4)
    expected = prompt + (max_tokens if max_tokens is not None else max(0, 1024 - prompt)) * n
    assert estimate_tokens("/v1/chat/completions", body, 1024) == max(1, expected)
    assert estimate_tokens("/v1/embeddings", {"input": ["x" * chars, [1, 2, 3]]}, 1024) == max(1, prompt + 3)


@given(ms=st.integers(0, 10**7))
def test_reset_durations_read_like_openais(ms: int) -> None:
    text = format_reset(ms)
    if ms < 1000:
        assert text == f"{ms}ms"
    else:
        minutes, _, seconds = text.rpartition("m")
        assert seconds.endswith("s")
        assert abs((int(minutes or 0) * 60 + float(seconds[:-1])) * 1000 - ms) < 1
    assert format_reset(6000) == "6s" and format_reset(90_500) == "1m30.5s"


@pytest.fixture(scope="module")
def lua_redis() -> Any:
    with EmbeddedRedis() as server:
        yield server


def test_rate_limit_script_is_atomic_and_refills(lua_redis: EmbeddedRedis) -> None:
    async def scenario() -> None:
        r = aioredis.from_url(lua_redis.url)
        limiter = RateLimiter(r, window_ms=2000)
        key = Principal("unit-1", rpm=20, tpm=0)
        decisions = await asyncio.gather(*(limiter.take(key, 1) for _ in range(50)))
        assert sum(d.admitted for d in decisions) == 20  # atomic: no two callers took the same unit
        refused = next(d for d in decisions if not d.admitted)
        assert refused.error is not None and refused.error.status == 429
        assert refused.error.code == "rate_limit_exceeded" and int(refused.error.headers["Retry-After"]) >= 1
        await asyncio.sleep(0.25)  # 20 per 2 s refills one unit every 0.1 s
        assert sum([(await limiter.take(key, 1)).admitted for _ in range(5)]) in (2, 3)
        tokens = Principal("unit-2", rpm=0, tpm=100)
        assert (await limiter.take(tokens, 60)).admitted and not (await limiter.take(tokens, 60)).admitted
        too_big = await limiter.take(tokens, 101)
        assert too_big.error is not None and too_big.error.headers["x-should-retry"] == "false"
        assert (await limiter.take(Principal("unit-3"), 10**9)).admitted  # no limits: no Redis call at all
        assert not await r.exists(keys.rate_limit_bucket("unit-3", "requests"))
        await r.aclose()

    asyncio.run(scenario())


def test_registry_hides_forbidden_models_and_names_the_kind(lua_redis: EmbeddedRedis) -> None:
    from api import auth

    async def scenario() -> None:
        r = aioredis.from_url(lua_redis.url)
        registry = WorkerRegistry(r)
        worker = WorkerInfo(worker_id="w-sec", kind="chat", model="m-sec", device="cpu", dtype="float32",
                            hostname="h", pid=1, started=0.0, vocab_size=512)
        await r.set(keys.worker_heartbeat("w-sec"), encode(worker), px=10_000)
        await registry.require_model("m-sec", "chat")
        with pytest.raises(APIError) as info:
            await registry.require_model("m-sec", "embed")
        assert info.value.status == 400 and info.value.code == "model_not_supported"
        token = auth.current.set(Principal("k", models=frozenset({"other"})))
        try:
            with pytest.raises(APIError) as info:
                await registry.require_model("m-sec", "chat")
            assert info.value.status == 404 and info.value.code == "model_not_found"
        finally:
            auth.current.reset(token)
        await r.delete(keys.worker_heartbeat("w-sec"))
        await r.aclose()

    asyncio.run(scenario())


def test_openapi_document_describes_the_bodies() -> None:
    from api.openapi import add_request_bodies

    doc = add_request_bodies({"paths": {p: {"post": {"responses": {}}} for p in REQUEST_BODIES}})
    for path in REQUEST_BODIES:
        op = doc["paths"][path]["post"]
        assert "requestBody" in op and set(op["responses"]) >= {"400", "401", "404", "413", "429"}
    schemas = doc["components"]["schemas"]
    assert {EmbeddingRequest.__name__, RerankRequest.__name__, "ChatCompletionRequest"} <= set(schemas)
    assert schemas["RequestMessage"]["properties"]["role"] == {"enum": list(protocol.ROLES)}
    temperature = schemas["ChatCompletionRequest"]["properties"]["temperature"]
    assert {"type": "number", "minimum": 0.0, "maximum": 2.0} in temperature["anyOf"]

