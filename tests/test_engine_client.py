"""The external engine's answers normalised: error shapes, chunks with several tokens or no finish_reason, usage,
and the character numbering a takeover relies on (pure functions; the engines themselves run in
test_external_engine.py and test_max_engine.py)."""

from __future__ import annotations

import json

import pytest

from common.protocol import ChatJob, ChatMessage, GuidedDecoding, SamplingParams
from workers.chat.external.client import (
    MAX_LACKS,
    Piece,
    build_request,
    error_from_body,
    lacked_features,
    parse_chunk,
)
from workers.chat.external.relay import Choice


def _job(**kw: object) -> ChatJob:
    fields: dict = {"params": SamplingParams(temperature=0.0, max_tokens=5),
                    "messages": [ChatMessage("user", "hi")]} | kw
    return ChatJob(request_id="r", model="m", created=0.0, **fields)


@pytest.mark.parametrize(("status", "body", "expected"), [
    (422, {"detail": [{"loc": ["body", "top_k"], "msg": "extra"}]}, (422, "invalid_request_error", None)),
    (400, {"detail": "Value error."}, (400, "invalid_request_error", None)),
    (400, {"error": {"message": "bad", "type": "invalid_request_error", "code": "400", "param": "n"}},
     (400, "invalid_request_error", "400")),
    (500, {"detail": "boom"}, (502, "server_error", "engine_error")),
])
def test_engine_errors_become_openai_errors(status: int, body: dict, expected: tuple) -> None:
    failed = error_from_body(status, json.dumps(body).encode())
    assert (failed.status, failed.type, failed.code) == expected
    assert failed.message
    assert error_from_body(503, b"upstream down").message.endswith("upstream down")


def test_chunks_with_several_tokens_no_finish_reason_and_a_usage_chunk() -> None:
    pieces, usage = parse_chunk({"choices": [{"index": 0, "delta": {"content": "ab cd", "role": "assistant"}}]})
    assert [(p.index, p.text, p.finish_reason) for p in pieces] == [(0, "ab cd", None)] and usage is None
    pieces, usage = parse_chunk({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    assert pieces == [] and usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (7, 3)
    pieces, _ = parse_chunk({"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]})  # completions
    assert (pieces[0].text, pieces[0].finish_reason) == ("x", "length")


def test_character_numbering_skips_what_a_dead_worker_published() -> None:
    choice = Choice(0, skip=4)
    assert choice.add(Piece(0, "abc")) is None  # chars 0..2: already relayed
    delta = choice.add(Piece(0, "defg"))  # chars 3..6: only 4..6 are new
    assert delta is not None and (delta.text, delta.seq) == ("efg", 6)
    assert choice.add(Piece(0, "", finish_reason="length")) is None and choice.finish_reason == "length"


def test_requests_send_only_what_is_set_and_lacks_are_named() -> None:
    path, body = build_request(_job(), "engine-model")
    assert path == "/v1/chat/completions" and body["model"] == "engine-model"
    assert body["stream_options"] == {"include_usage": True}
    assert not {"n", "top_k", "seed", "stop", "logit_bias", "add_generation_prompt", "chat_template_kwargs"} & \
        body.keys()
    _, body = build_request(_job(continue_final_message=True, add_generation_prompt=False,
                                 chat_template_kwargs={"enable_thinking": False},
                                 params=SamplingParams(guided=GuidedDecoding(kind="choice", choices=["a", "b"]))), "m")
    assert (body["continue_final_message"], body["add_generation_prompt"]) == (True, False)
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["guided_choice"] == ["a", "b"]
    _, body = build_request(_job(params=SamplingParams(guided=GuidedDecoding(kind="regex", text="[a-z]+"))), "m")
    assert body["guided_regex"] == "[a-z]+" and "response_format" not in body
    path, body = build_request(_job(prompt="Once", messages=[]), "m")
    assert path == "/v1/completions" and body["prompt"] == "Once"
    wide = _job(n=2, params=SamplingParams(guided=GuidedDecoding(kind="json_object"), presence_penalty=0.5))
    assert lacked_features(wide, MAX_LACKS) == ["n", "response_format", "penalties"]
    assert lacked_features(wide, frozenset()) == []
