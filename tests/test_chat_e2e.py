"""`axion serve` (embedded Redis) driven by the official openai SDK over real HTTP, checked against generate()."""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
PROMPTS = ["Hello there, how are you today?", "Write one line about the sea.", "2 + 2 = ?"]


@cache
def _model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def reference(model_dir: str, messages: list[dict], max_tokens: int) -> tuple[str, int, int]:
    """Greedy `model.generate` on the chat template: (text, prompt tokens, completion tokens)."""
    import torch

    model, tok = _model(model_dir)
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    return tok.decode(new, skip_special_tokens=True), enc["input_ids"].shape[1], len(new)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_non_streaming_greedy_equals_generate(served: Server, prompt: str) -> None:
    messages = [SYSTEM, {"role": "user", "content": prompt}]
    resp = served.client().chat.completions.create(model=served.model, messages=messages, temperature=0,
                                                   max_tokens=24)
    text, prompt_tokens, completion_tokens = reference(served.model, messages, 24)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt_tokens, completion_tokens) == (
        prompt_tokens, 24)
    assert resp.usage.total_tokens == prompt_tokens + 24


def test_streaming_wire_shape_and_usage(served: Server) -> None:
    messages = [{"role": "user", "content": PROMPTS[1]}]
    stream = served.client().chat.completions.create(model=served.model, messages=messages, temperature=0,
                                                     max_tokens=20, stream=True,
                                                     stream_options={"include_usage": True})
    chunks = list(stream)
    text, prompt_tokens, completion_tokens = reference(served.model, messages, 20)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (prompt_tokens, 20)
    assert [c.choices[0].finish_reason for c in content_chunks].count("length") == 1
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in content_chunks)
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == text
    assert completion_tokens == 20


def test_stream_without_include_usage_sends_no_usage_chunk(served: Server) -> None:
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.base_url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-accel-buffering"] == "no"
        frames = [line for line in resp.iter_lines() if line]
    assert frames[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in frames)
    assert not any('"usage"' in line for line in frames)
    assert not any('"choices":[]' in line for line in frames)


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(served: Server) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(served.client().chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, n=2, seed=1, stream=True,
        stream_options=options, extra_body={"ignore_eos": True}))  # type: ignore[arg-type]
    *running, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is not None and c.usage.prompt_tokens == last.usage.prompt_tokens for c in running)
    counts = [c.usage.completion_tokens for c in running if c.usage is not None]
    assert counts == sorted(counts) and counts[-1] == last.usage.completion_tokens == 16
    legacy = list(served.client().completions.create(
        model=served.model, prompt=["one", "two words"], max_tokens=5, seed=1, stream=True,
        stream_options={"continuous_usage_stats": True}, extra_body={"ignore_eos": True}))  # type: ignore[arg-type]
    totals = [c.usage.completion_tokens for c in legacy if c.usage is not None]
    assert len(totals) == len(legacy) and totals == sorted(totals) and totals[-1] == 10
    assert legacy[-1].usage is not None and legacy[-1].usage.prompt_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_text_before_it(served: Server, stream: bool) -> None:
    messages = [{"role": "user", "content": PROMPTS[0]}]
    full, _, _ = reference(served.model, messages, 40)
    ascii_runs = [i for i in range(8, len(full) - 3) if full[i:i + 2].isascii() and full[i:i + 2].strip()]
    assert ascii_runs, f"no usable stop text in {full!r}"
    stop = full[ascii_runs[0]:ascii_runs[0] + 2]
    expected = full[:full.find(stop)]
    kwargs = {"model": served.model, "messages": messages, "temperature": 0, "max_tokens": 40,
              "stop": [stop, "\u2603never"]}
    if stream:
        chunks = list(served.client().chat.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        resp = served.client().chat.completions.create(**kwargs)
        text, finish = resp.choices[0].message.content, resp.choices[0].finish_reason
    assert text == expected
    assert stop not in text
    assert finish == "stop"


def test_max_completion_tokens_wins_over_max_tokens(served: Server) -> None:
    resp = served.client().chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "count"}], temperature=0, max_tokens=20,
        max_completion_tokens=5)
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    assert resp.choices[0].finish_reason == "length"


def test_seed_makes_sampling_reproducible(served: Server) -> None:
    def sample(seed: int) -> str:
        resp = served.client().chat.completions.create(
            model=served.model, messages=[{"role": "user", "content": "tell me"}], temperature=1.0, top_p=0.9,
            seed=seed, max_tokens=16, extra_body={"top_k": 50})
        return resp.choices[0].message.content or ""

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in range(5)}) > 1


def test_content_parts_and_developer_role(served: Server) -> None:
    parts = [{"type": "text", "text": "Hello there, "}, {"type": "text", "text": "how are you today?"}]
    resp = served.client().chat.completions.create(
        model=served.model, messages=[{"role": "developer", "content": "You are a terse assistant."},
                                      {"role": "user", "content": parts}],
        temperature=0, max_tokens=12, extra_body={"some_unknown_field": {"x": 1}})
    text, _, _ = reference(served.model, [{"role": "developer", "content": "You are a terse assistant."},
                                          {"role": "user", "content": PROMPTS[0]}], 12)
    assert resp.choices[0].message.content == text


def test_unknown_model_is_404(served: Server) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        served.client().chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_prompt_over_context_length_is_400(served: Server) -> None:
    long = " ".join(["word"] * 1100)  # MAX_SEQ_LEN is 1024 in this fixture
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            served.client().chat.completions.create(model=served.model, stream=stream,
                                                    messages=[{"role": "user", "content": long}])
        assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        served.client().chat.completions.create(model=served.model, max_tokens=1010,
                                                messages=[{"role": "user", "content": "short prompt"}])
    assert info.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                   "function": {"name": "g"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"²": 1}}, "logit_bias"),  # str.isdigit() is true of it, int() refuses it: once a 500
    ({"logit_bias": {"--5": 1}}, "logit_bias"),
    ({"logit_bias": {"٣": 1}}, "logit_bias"),  # an Arabic-Indic 3, which int() would read as token 3
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"stop_token_ids": [99999]}, "stop_token_ids"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 1.01}, "top_p"),  # 0 is valid, as in OpenAI
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
])
def test_bad_requests_get_400_envelopes(served: Server, extra: dict, param: str) -> None:
    body = {"model": served.model, "messages": [{"role": "user", "content": "x"}], **extra}
    resp = httpx.post(f"{served.base_url}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and isinstance(error["code"], str)


@pytest.mark.parametrize(("method", "path", "content", "status"), [
    ("POST", "/v1/chat/completions", b"{not json", 400),
    ("POST", "/v1/chat/completions", b"", 400),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400),
    ("GET", "/v1/nothing-here", None, 404),
    ("GET", "/v1/chat/completions", None, 405),
])
def test_malformed_requests_get_envelopes(served: Server, method: str, path: str, content: bytes | None,
                                          status: int) -> None:
    resp = httpx.request(method, f"{served.base_url}{path}", content=content, timeout=30,
                         headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_models_and_health(served: Server) -> None:
    models = served.client().models.list()
    assert [m.id for m in models.data] == [served.model]
    health = httpx.get(f"{served.base_url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["redis"]["reachable"] is True
    assert health["models"] == [served.model]
    (worker,) = health["workers"]
    assert worker["model"] == served.model and worker["device"] == "cpu" and worker["dtype"] == "float32"
    assert worker["memory"]["weights_bytes"] > 0 and worker["memory"]["rss_bytes"] > 0
    # The heartbeat refreshes every HEARTBEAT_TTL_S / 3 (3.3 s): the last test's request may still show.
    deadline = time.monotonic() + 10
    while worker["active_sequences"] and time.monotonic() < deadline:
        time.sleep(0.5)
        (worker,) = httpx.get(f"{served.base_url}/health", timeout=10).json()["workers"]
    assert worker["active_sequences"] == 0


def test_shared_system_prompt_reports_cached_tokens(served: Server) -> None:
    system = {"role": "system", "content": "You answer questions about ships and stars, briefly. " * 5}
    usages = []
    for question in ("first question", "second question"):
        messages = [system, {"role": "user", "content": question}]
        resp = served.client().chat.completions.create(model=served.model, messages=messages, temperature=0,
                                                       max_tokens=8)
        assert resp.choices[0].message.content == reference(served.model, messages, 8)[0]
        usages.append(resp.usage)
    assert usages[1].prompt_tokens_details is not None
    assert usages[1].prompt_tokens_details.cached_tokens >= 64
    assert usages[1].prompt_tokens_details.cached_tokens < usages[1].prompt_tokens


def test_embedded_redis_is_announced_in_log(served: Server) -> None:
    log = served.procs[0].log()
    assert "REDIS_URL is unset: started an embedded Redis" in log
    assert Path(served.model).is_dir()


def test_logprobs_through_the_sdk(served: Server) -> None:
    messages = [{"role": "user", "content": PROMPTS[1]}]
    resp = served.client().chat.completions.create(model=served.model, messages=messages, temperature=0,
                                                   max_tokens=8, logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert resp.usage is not None and len(content) == resp.usage.completion_tokens == 8
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 and t.bytes is not None for t in content)
    chunks = list(served.client().chat.completions.create(model=served.model, messages=messages, temperature=0,
                                                          max_tokens=8, logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [(t.token, round(t.logprob, 5)) for t in content]


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices(served: Server, stream: bool) -> None:
    messages = [{"role": "user", "content": PROMPTS[2]}]
    expected, _, _ = reference(served.model, messages, 10)
    kwargs = {"model": served.model, "messages": messages, "temperature": 0, "max_tokens": 10, "n": 3}
    if stream:
        chunks = list(served.client().chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                              **kwargs))
        texts, finishes, roles = ["", "", ""], [None] * 3, set()
        for chunk in chunks:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                finishes[choice.index] = choice.finish_reason or finishes[choice.index]
                if choice.delta.role:
                    roles.add(choice.index)
        usage = chunks[-1].usage
        assert roles == {0, 1, 2}
    else:
        resp = served.client().chat.completions.create(**kwargs)
        texts = [c.message.content for c in sorted(resp.choices, key=lambda c: c.index)]
        finishes, usage = [c.finish_reason for c in resp.choices], resp.usage
    assert texts == [expected] * 3 and finishes == ["length"] * 3
    assert usage is not None and usage.completion_tokens == 30


def test_request_id_is_echoed_and_logged(served: Server) -> None:
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    given = httpx.post(f"{served.base_url}/v1/chat/completions", json=body, timeout=30,
                       headers={"X-Request-Id": "trace-abc.42"})
    assert given.status_code == 200 and given.headers["x-request-id"] == "trace-abc.42"
    made = httpx.post(f"{served.base_url}/v1/chat/completions", json=body, timeout=30)
    assert len(made.headers["x-request-id"]) == 32
    refused = httpx.post(f"{served.base_url}/v1/chat/completions", json={**body, "model": "nope"}, timeout=30,
                         headers={"X-Request-Id": "trace-404"})
    assert refused.status_code == 404 and refused.headers["x-request-id"] == "trace-404"
    deadline = time.monotonic() + 5
    while "request trace-abc.42." not in served.procs[0].log() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(x for x in served.procs[0].log().splitlines() if "request trace-abc.42." in x)
    assert "done finish=length" in line and "completion=3" in line


def test_queued_stream_gets_keepalive_comments(served: Server) -> None:
    """MAX_BATCH_SIZE is 2 and SSE_KEEPALIVE_S 0.2 here: behind six long requests, ours waits in the stream
    (600 tokens each: with 230 it waited under 0.2 s in 1 of 6 runs once the engine's step got faster).
    `Cache-Control: no-store` keeps the response cache out: the six would otherwise share one generation."""
    import threading

    no_store = {"Cache-Control": "no-store"}

    long = {"model": served.model, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 600,
            "temperature": 0, "ignore_eos": True}
    blockers = [threading.Thread(target=httpx.post, args=(f"{served.base_url}/v1/chat/completions",),
                                 kwargs={"json": long, "timeout": 60, "headers": no_store}) for _ in range(6)]
    for thread in blockers:
        thread.start()
    time.sleep(0.3)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    body = {"model": served.model, "messages": messages, "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.base_url}/v1/chat/completions", json=body, timeout=60,
                      headers=no_store) as resp:
        lines = [line for line in resp.iter_lines() if line]
    for thread in blockers:
        thread.join()
    assert ": keep-alive" in lines
    assert lines[-1] == "data: [DONE]"
    import json

    text = "".join((json.loads(x[6:])["choices"][0]["delta"].get("content") or "") for x in lines
                   if x.startswith("data: {"))
    assert text == reference(served.model, messages, 6)[0]


def test_penalties_bias_and_extras_through_the_sdk(served: Server) -> None:
    import torch

    from workers.chat.logprobs import TokenBytes

    client = served.client()
    messages = [{"role": "user", "content": PROMPTS[1]}]
    model, tok = _model(served.model)
    by_bytes = {tuple(TokenBytes(tok)(i)[1]): i for i in range(len(tok))}  # byte-level BPE: bytes name one entry

    def ids(**kwargs: object) -> list[int]:
        """The generated token ids, read back from the logprobs' exact bytes."""
        resp = client.chat.completions.create(model=served.model, messages=messages, max_tokens=10, logprobs=True,
                                              **{"temperature": 0, **kwargs})
        return [by_bytes[tuple(t.bytes)] for t in resp.choices[0].logprobs.content]

    greedy = ids()
    assert ids(logit_bias={"100": 100}) == [100] * 10
    assert ids(logit_bias={str(greedy[0]): -100})[0] != greedy[0]
    # Penalties reach the engine intact: the server's tokens equal the engine's own on the same parameters
    # (their effect is tested in tests/test_sampling.py).
    from common.protocol import ChatJob, ChatMessage, SamplingParams
    from workers.chat.engine import ChatEngine

    engine = ChatEngine(model, tok, torch.device("cpu"), 1024)
    params = SamplingParams(temperature=0.0, max_tokens=10, logit_bias={100: 8.0}, frequency_penalty=-2.0,
                            presence_penalty=-1.0)  # negative: rewards repeats, so greedy output must change
    seq = engine.prepare(ChatJob(request_id="x", model="m", messages=[ChatMessage("user", PROMPTS[1])],
                                 params=params, created=0.0))
    engine.add(seq)  # type: ignore[arg-type]
    while engine.active:
        engine.step()
    penalised = ids(logit_bias={"100": 8}, frequency_penalty=-2.0, presence_penalty=-1.0)
    assert penalised == seq.output_ids and penalised != greedy  # type: ignore[union-attr]
    assert ids(temperature=1.0, seed=9, extra_body={"min_p": 1.0}) == greedy
    stop_at = client.chat.completions.create(model=served.model, messages=messages, temperature=0, max_tokens=10,
                                             extra_body={"stop_token_ids": [greedy[3]]})
    assert stop_at.choices[0].finish_reason == "stop"
    assert stop_at.usage is not None and stop_at.usage.completion_tokens == greedy.index(greedy[3]) + 1
    repeated = client.chat.completions.create(model=served.model, messages=messages, temperature=0, max_tokens=10,
                                              extra_body={"repetition_penalty": 1.5})
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False, repetition_penalty=1.5)
    assert repeated.choices[0].message.content == tok.decode(out[0, enc["input_ids"].shape[1]:],
                                                             skip_special_tokens=True)
