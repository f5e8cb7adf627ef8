"""Request validation (no server) and the 404-versus-503 rule of the worker registry (fakeredis)."""

from __future__ import annotations

import asyncio
import json
import time

import fakeredis
import pytest

from api.errors import APIError
from api.protocol import decode_chat_request, output_limit, stop_list
from api.registry import WorkerRegistry
from api.serving_chat import build_job
from common import heartbeat, keys
from common.protocol import WorkerInfo, decode_job, encode


def body(**fields: object) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def test_job_roundtrip_and_parameter_mapping() -> None:
    req = decode_chat_request(body(temperature=0, max_tokens=9, max_completion_tokens=4, stop="x", seed=3,
                                   top_k=-1, min_tokens=2, ignore_eos=True, user="u", whatever=[1]))
    assert output_limit(req) == 4 and stop_list(req) == ["x"]
    job = decode_job(encode(build_job(req, "rid")))
    assert job.request_id == "rid" and job.v == 1
    p = job.params
    assert (p.temperature, p.max_tokens, p.stop, p.seed, p.top_k, p.min_tokens, p.ignore_eos) == (
        0.0, 4, ["x"], 3, 0, 2, True)


@pytest.mark.parametrize(("fields", "param"), [
    ({"top_k": -2}, "top_k"), ({"stop": [""]}, "stop[0]"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"seed": 2**64}, "seed"), ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                                "messages[0].content[0].type"),
])
def test_invalid_fields_are_named(fields: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        decode_chat_request(body(**fields))
    assert info.value.status == 400 and info.value.param == param


def test_min_tokens_is_capped_by_the_output_limit() -> None:
    def min_tokens(**fields: object) -> int:
        return decode_job(encode(build_job(decode_chat_request(body(**fields)), "r"))).params.min_tokens

    assert min_tokens(min_tokens=5, max_tokens=2) == 2 and min_tokens(min_tokens=5) == 5


def test_a_json_schema_format_without_a_schema_asks_for_any_json_object() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x"}}
    guided = decode_job(encode(build_job(decode_chat_request(body(response_format=fmt)), "r"))).params.guided
    assert guided is not None and guided.kind == "json_object"


@pytest.mark.parametrize(("field", "value"), [
    ("use_beam_search", True), ("include_stop_str_in_output", True), ("bad_words", ["x"]),
    ("allowed_token_ids", [1]), ("skip_special_tokens", False), ("chat_template", "{{ x }}"), ("priority", 3),
    ("add_special_tokens", True), ("length_penalty", 2.0)])
def test_vllm_extras_not_served_are_named_in_a_400(field: str, value: object) -> None:
    with pytest.raises(APIError) as info:
        decode_chat_request(body(**{field: value}))
    assert info.value.status == 400 and info.value.param == field and info.value.code == "unsupported_parameter"


def test_neutral_values_of_unimplemented_fields_are_accepted() -> None:
    decode_chat_request(body(use_beam_search=False, skip_special_tokens=True, bad_words=[], priority=0,
                             length_penalty=1.0, add_special_tokens=False, include_stop_str_in_output=False))
    decode_chat_request(body(tools=[], response_format={"type": "text"}, tool_choice="none", modalities=["text"]))


def test_sampling_depth_maps_into_the_job() -> None:
    req = decode_chat_request(body(n=3, logprobs=True, top_logprobs=5, presence_penalty=0.5, frequency_penalty=-1,
                                   logit_bias={"7": -100, "9": 2.5}, repetition_penalty=1.2, min_p=0.1,
                                   stop_token_ids=[3, 4]))
    job = decode_job(encode(build_job(req, "r")))
    p = job.params
    assert job.n == 3 and p.logprobs and p.top_logprobs == 5
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p) == (0.5, -1.0, 1.2, 0.1)
    assert p.logit_bias == {7: -100.0, 9: 2.5} and p.stop_token_ids == [3, 4]


def test_registry_tells_unknown_from_unavailable() -> None:
    async def scenario() -> None:
        r = fakeredis.FakeAsyncRedis()
        registry = WorkerRegistry(r)
        with pytest.raises(APIError) as info:
            await registry.require_model("m")
        assert info.value.status == 404 and info.value.code == "model_not_found"
        await r.sadd(keys.KNOWN_MODELS, "m")
        with pytest.raises(APIError) as info:
            await registry.require_model("m")
        assert info.value.status == 503 and "Retry-After" in info.value.headers
        worker = WorkerInfo(worker_id="w1", kind="chat", model="m", device="cpu", dtype="float32", hostname="h",
                            pid=1, started=0.0)
        await heartbeat.write(r.pipeline(transaction=False), worker, ttl_s=10).execute()
        await registry.require_model("m")
        assert await registry.served_models() == ["m"]

    asyncio.run(scenario())


def test_registry_waits_the_grace_period_and_knows_its_default_model() -> None:
    """The replica's own default model is a 503 (retried by clients) even when Redis forgot every model, after
    waiting up to the grace period for a worker; a worker that beats during the wait is taken at once."""
    async def scenario() -> None:
        r = fakeredis.FakeAsyncRedis()
        registry = WorkerRegistry(r, default_models=("m",), grace_s=0.3)
        start = time.monotonic()
        with pytest.raises(APIError) as info:
            await registry.require_model("m")
        assert info.value.status == 503 and 0.3 <= time.monotonic() - start < 1.0
        with pytest.raises(APIError) as info:
            await registry.require_model("other")
        assert info.value.status == 404

        worker = WorkerInfo(worker_id="w1", kind="chat", model="m", device="cpu", dtype="float32", hostname="h",
                            pid=1, started=0.0)

        async def beat_later() -> None:
            await asyncio.sleep(0.1)
            await heartbeat.write(r.pipeline(transaction=False), worker, ttl_s=10).execute()

        registry.grace_s = 5.0
        start = time.monotonic()
        await asyncio.gather(registry.require_model("m"), beat_later())
        assert time.monotonic() - start < 1.0

    asyncio.run(scenario())


def test_registry_sees_workers_that_write_no_index_entry() -> None:
    """A worker of the previous release only sets its heartbeat key: a rolling upgrade that starts with the
    API must still see it (the registry scans when the index is empty)."""
    async def scenario() -> None:
        r = fakeredis.FakeAsyncRedis()
        worker = WorkerInfo(worker_id="old", kind="chat", model="m", device="cpu", dtype="float32", hostname="h",
                            pid=1, started=0.0)
        await r.set(keys.worker_heartbeat("old"), encode(worker), px=10_000)
        assert [w.worker_id for w in await WorkerRegistry(r).workers()] == ["old"]

    asyncio.run(scenario())
