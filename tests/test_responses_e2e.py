"""The Responses API through the official openai SDK: answers and their stream events, function tools, structured
output, reasoning items, and stored responses shared by two API replicas on one Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from common import keys
from common.redis_server import EmbeddedRedis, free_port
from tests.conftest import Proc, Server, axion_env, serving, wait_ready
from tests.test_reasoning import OPENS, serving_with_template

TOOL = {"type": "function", "name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}}}}


class Replicas(Server):
    """`axion serve` on a Redis of its own plus a second `axion api` replica on that Redis."""

    second_url: str


@pytest.fixture(scope="module")
def replicas(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    logs = tmp_path_factory.mktemp("responses")
    store = EmbeddedRedis().start()
    try:
        with serving(tiny_model_dir, logs, REDIS_URL=store.url, MAX_SEQ_LEN="1024",
                     RESPONSE_STORE_TTL_S="600") as first:
            port = free_port()
            second = Proc(["api"], axion_env(tiny_model_dir, store.url, port, RESPONSE_STORE_TTL_S="600"),
                          logs / "api2.log").start()
            try:
                server = Replicas(first.base_url, first.model, first.procs, store.url)
                server.second_url = f"http://127.0.0.1:{port}"
                wait_ready(server.second_url, [second])
                yield server
            finally:
                second.stop()
    finally:
        store.stop()


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def test_an_answer_is_the_chat_answer_of_the_same_prompt(replicas: Replicas) -> None:
    sdk = replicas.client()
    resp = sdk.responses.create(model=replicas.model, input="Tell me about the sea.", instructions="Be brief.",
                                max_output_tokens=12, temperature=0)
    chat = sdk.chat.completions.create(model=replicas.model, max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."}])
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == replicas.model
    assert resp.output_text == chat.choices[0].message.content != ""
    assert resp.status == "incomplete" and resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage is not None and chat.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (chat.usage.prompt_tokens, 12)
    (message,) = resp.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")


def test_streamed_events_follow_openais_names_and_order(replicas: Replicas) -> None:
    sdk = replicas.client()
    whole = sdk.responses.create(model=replicas.model, input="A stream.", max_output_tokens=8, temperature=0,
                                 store=False)
    events = list(sdk.responses.create(model=replicas.model, input="A stream.", max_output_tokens=8,
                                       temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert deltas == final.output_text == whole.output_text
    assert sdk.responses.retrieve(final.id).output_text == deltas  # stored before the last event
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(whole.id)  # store: false


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_call_and_its_output_continue_the_conversation(replicas: Replicas, stream: bool) -> None:
    sdk = replicas.client()
    ask: dict[str, Any] = {"model": replicas.model, "input": "What time is it?", "tools": [TOOL],
                           "tool_choice": "required", "max_output_tokens": 100, "parallel_tool_calls": False}
    if stream:
        events = list(sdk.responses.create(stream=True, **ask))
        kinds = [e.type for e in events]
        assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
        first = events[-1].response  # type: ignore[union-attr]
    else:
        first = sdk.responses.create(**ask)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_time" and call.call_id
    assert json.loads(call.arguments)["zone"] in ("utc", "cet") and first.status == "completed"
    follow = sdk.responses.create(model=replicas.model, previous_response_id=first.id, max_output_tokens=4,
                                  tools=[TOOL],  # tools, as instructions, are the request's own (OpenAI's rule)
                                  input=[{"type": "function_call_output", "call_id": call.call_id, "output": "noon"}])
    assert follow.previous_response_id == first.id
    assert follow.usage is not None and first.usage is not None
    assert follow.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens  # the call, replayed


def test_structured_output_follows_the_schema(replicas: Replicas) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["mood"],
              "properties": {"mood": {"type": "string", "enum": ["calm", "rough"]}}}
    resp = replicas.client().responses.create(
        model=replicas.model, input="The sea today?", max_output_tokens=40, temperature=0.7,
        text={"format": {"type": "json_schema", "name": "sea", "schema": schema, "strict": True}})
    assert json.loads(resp.output_text)["mood"] in ("calm", "rough")
    assert resp.text.format is not None and resp.text.format.type == "json_schema"


def test_stored_responses_are_shared_by_the_replicas(replicas: Replicas) -> None:
    first, second = client(replicas.base_url), client(replicas.second_url)
    asked = first.responses.create(model=replicas.model, input="Remember this.", max_output_tokens=6,
                                   metadata={"who": "test"})
    seen = second.responses.retrieve(asked.id)
    assert seen.output_text == asked.output_text and seen.metadata == {"who": "test"}
    ttl = redis.Redis.from_url(replicas.redis_url or "").ttl(keys.response(asked.id))
    assert 0 < ttl <= 600
    follow = second.responses.create(model=replicas.model, input="And now?", previous_response_id=asked.id,
                                     max_output_tokens=4)
    assert follow.usage is not None and asked.usage is not None
    assert follow.usage.input_tokens > asked.usage.input_tokens + asked.usage.output_tokens
    first.responses.delete(asked.id)
    with pytest.raises(openai.NotFoundError):
        second.responses.retrieve(asked.id)
    with pytest.raises(openai.BadRequestError) as caught:
        second.responses.create(model=replicas.model, input="x", previous_response_id=asked.id)
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]


@pytest.mark.parametrize(("body", "param"), [
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"foo": 1}, "foo"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"input": []}, "input"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [TOOL]}, "tool_choice"),
])
def test_what_is_not_served_is_a_400_naming_it(replicas: Replicas, body: dict, param: str) -> None:
    resp = httpx.post(f"{replicas.base_url}/v1/responses",
                      json={"model": replicas.model, "input": "x", "max_output_tokens": 2, **body}, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


@pytest.fixture(scope="module")
def opens_thinking(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serving_with_template(tiny_model_dir, tmp_path_factory, OPENS)


def test_reasoning_comes_as_its_own_item(opens_thinking: Server) -> None:
    """The template leaves <think> open, so the answer starts inside the reasoning (random weights never close it)."""
    sdk = opens_thinking.client()
    resp = sdk.responses.create(model=opens_thinking.model, input="Think.", max_output_tokens=6, temperature=0)
    reasoning, message = resp.output
    assert reasoning.type == "reasoning" and reasoning.content and reasoning.content[0].text
    assert message.type == "message" and resp.output_text == ""
    events = list(sdk.responses.create(model=opens_thinking.model, input="Think.", max_output_tokens=6,
                                       temperature=0, stream=True))
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert streamed == reasoning.content[0].text
    assert "response.reasoning_text.done" in [e.type for e in events]
