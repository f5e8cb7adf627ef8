"""Chat cache keys and policy: every output-changing field changes the key; `user` and `stream` do not."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from api.cache import cache_key
from api.chat_cache import canonical_request, is_deterministic, replay
from api.protocol import ChatCompletion, decode_chat_request

BASE: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}

CHANGES: list[tuple[str, Any]] = [
    ("messages", [{"role": "user", "content": "hello"}]),
    ("model", "other"),
    ("temperature", 0.5),
    ("top_p", 0.9),
    ("max_tokens", 7),
    ("stop", ["x"]),
    ("seed", 1),
    ("n", 2),
    ("logprobs", True),
    ("top_logprobs", 2),  # with logprobs: true, so it differs from the row above too
    ("presence_penalty", 0.1),
    ("frequency_penalty", 0.1),
    ("logit_bias", {"5": 1.0}),
    ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("tool_choice", "none"),
    ("parallel_tool_calls", False),
    ("top_k", 5),
    ("min_p", 0.1),
    ("min_tokens", 2),
    ("ignore_eos", True),
    ("repetition_penalty", 1.2),
    ("stop_token_ids", [3]),
]


def key_of(body: dict[str, Any], revision: str = "r1") -> str:
    if "logprobs" not in body and "top_logprobs" in body:
        body = body | {"logprobs": True}
    req = decode_chat_request(json.dumps(body).encode())
    return cache_key(req.model, revision, canonical_request(req))


@pytest.mark.parametrize(("field", "value"), CHANGES, ids=[c[0] for c in CHANGES])
def test_each_output_changing_field_changes_the_key(field: str, value: Any) -> None:
    assert key_of(BASE | {field: value}) != key_of(BASE)


def test_every_change_gives_its_own_key() -> None:
    keys = {key_of(BASE | {field: value}) for field, value in CHANGES}
    assert len(keys) == len(CHANGES)


@pytest.mark.parametrize("extra", [{"user": "u1"}, {"stream": True}, {"stream": True, "stream_options":
                                                                      {"include_usage": True}},
                                   {"max_completion_tokens": None}, {"unknown_field": 1}])
def test_fields_that_cannot_change_the_output_keep_the_key(extra: dict[str, Any]) -> None:
    assert key_of(BASE | extra) == key_of(BASE)


def test_max_tokens_spellings_share_a_key_and_revision_is_in_it() -> None:
    assert key_of(BASE | {"max_tokens": 9}) == key_of(BASE | {"max_completion_tokens": 9})
    assert key_of(BASE, "r2") != key_of(BASE)


def test_default_policy_caches_only_deterministic_requests() -> None:
    def req(**fields: Any) -> Any:
        return decode_chat_request(json.dumps(BASE | fields).encode())

    assert is_deterministic(req())
    assert is_deterministic(req(temperature=1.0, seed=4))
    assert not is_deterministic(req(temperature=0.7))
    body = {k: v for k, v in BASE.items() if k != "temperature"}  # default temperature is 1
    assert not is_deterministic(decode_chat_request(json.dumps(body).encode()))


def test_replay_frames_carry_content_finish_and_usage() -> None:
    completion = msgspec.json.decode(json.dumps({
        "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "abc"}, "logprobs": None,
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode(), type=ChatCompletion)
    frames = list(replay(completion, include_usage=True))
    assert frames[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(f[6:]) for f in frames[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "abc"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 5
