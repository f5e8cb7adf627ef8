"""Legacy `POST /v1/completions` through the official openai SDK, checked against generate() on raw prompts."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import torch

from tests.conftest import Server
from tests.test_chat_e2e import _model

PROMPTS = ["Once upon a time", "The ships sailed under the stars and"]


def raw_reference(model_dir: str, prompt: str | list[int], max_tokens: int) -> tuple[str, int]:
    model, tok = _model(model_dir)
    ids = torch.tensor([prompt]) if isinstance(prompt, list) else tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ids.shape[1]


def test_string_prompt_greedy_and_usage(served: Server) -> None:
    resp = served.client().completions.create(model=served.model, prompt=PROMPTS[0], temperature=0, max_tokens=12)
    text, prompt_tokens = raw_reference(served.model, PROMPTS[0], 12)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.choices[0].text == text and resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt_tokens, 12)


def test_default_max_tokens_is_16_and_echo_prepends_the_prompt(served: Server) -> None:
    resp = served.client().completions.create(model=served.model, prompt=PROMPTS[0], temperature=0, echo=True)
    text, _ = raw_reference(served.model, PROMPTS[0], 16)
    assert resp.usage is not None and resp.usage.completion_tokens == 16
    assert resp.choices[0].text == PROMPTS[0] + text


def test_token_id_prompt_equals_its_text(served: Server) -> None:
    _, tok = _model(served.model)
    ids = tok(PROMPTS[1])["input_ids"]
    by_ids = served.client().completions.create(model=served.model, prompt=ids, temperature=0, max_tokens=8)
    by_text = served.client().completions.create(model=served.model, prompt=PROMPTS[1], temperature=0, max_tokens=8)
    assert by_ids.choices[0].text == by_text.choices[0].text == raw_reference(served.model, ids, 8)[0]


@pytest.mark.parametrize("stream", [False, True])
def test_several_prompts_times_n_choices(served: Server, stream: bool) -> None:
    kwargs = {"model": served.model, "prompt": PROMPTS, "temperature": 0, "max_tokens": 6, "n": 2}
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    if stream:
        chunks = list(served.client().completions.create(stream=True, stream_options={"include_usage": True},
                                                         **kwargs))
        for chunk in chunks:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
        usage = chunks[-1].usage
    else:
        resp = served.client().completions.create(**kwargs)
        texts = {c.index: c.text for c in resp.choices}
        finishes = {c.index: c.finish_reason for c in resp.choices}
        usage = resp.usage
    expected = [raw_reference(served.model, prompt, 6) for prompt in PROMPTS]
    assert texts == {0: expected[0][0], 1: expected[0][0], 2: expected[1][0], 3: expected[1][0]}
    assert set(finishes.values()) == {"length"}
    assert usage is not None and usage.completion_tokens == 24
    assert usage.prompt_tokens == expected[0][1] + expected[1][1]


def test_legacy_logprobs_shape(served: Server) -> None:
    resp = served.client().completions.create(model=served.model, prompt=PROMPTS[0], temperature=0, max_tokens=6,
                                              logprobs=2)
    lp = resp.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(logprob, abs=1e-5)
               for top, logprob in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    sampled = served.client().completions.create(model=served.model, prompt=PROMPTS[0], max_tokens=6, seed=3,
                                                 logprobs=0).choices[0].logprobs
    assert sampled is not None and sampled.top_logprobs is not None and sampled.token_logprobs is not None
    assert [list(top) for top in sampled.top_logprobs] == [[token] for token in sampled.tokens or []]  # OpenAI: +1
    assert [top[t] for top, t in zip(sampled.top_logprobs, sampled.tokens or [], strict=True)] == \
        sampled.token_logprobs


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", [1, 2]]}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [99999]}, "prompt"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
    ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
])
def test_bad_completion_requests(served: Server, body: dict, param: str) -> None:
    resp = httpx.post(f"{served.base_url}/v1/completions", json={"model": served.model, **body}, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_unknown_model_is_404(served: Server) -> None:
    with pytest.raises(openai.NotFoundError):
        served.client().completions.create(model="nope", prompt="x")


def test_tokenize_and_detokenize(served: Server) -> None:
    _, tok = _model(served.model)
    raw = httpx.post(f"{served.base_url}/tokenize", json={"model": served.model, "prompt": PROMPTS[1]}, timeout=30)
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["tokens"] == tok(PROMPTS[1])["input_ids"] and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 1024
    bare = httpx.post(f"{served.base_url}/tokenize", timeout=30,
                      json={"model": served.model, "prompt": PROMPTS[1], "add_special_tokens": False}).json()
    assert bare["tokens"] == tok(PROMPTS[1], add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(f"{served.base_url}/tokenize", json={"model": served.model, "messages": messages},
                      timeout=30).json()
    assert chat["tokens"] == tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    back = httpx.post(f"{served.base_url}/detokenize", json={"model": served.model, "tokens": bare["tokens"]},
                      timeout=30).json()
    assert back == {"prompt": PROMPTS[1]}


def test_add_special_tokens_and_unserved_extras(served: Server) -> None:
    def prompt_tokens(**extra: object) -> int:
        resp = served.client().completions.create(model=served.model, prompt=PROMPTS[0], max_tokens=1,
                                                  extra_body=extra)
        assert resp.usage is not None
        return resp.usage.prompt_tokens

    assert prompt_tokens(add_special_tokens=False) == prompt_tokens() - 1  # the BOS the tokenizer adds
    with pytest.raises(openai.BadRequestError) as caught:
        served.client().completions.create(model=served.model, prompt="x", max_tokens=1,
                                           extra_body={"bad_words": ["x"]})
    assert caught.value.body["param"] == "bad_words"  # type: ignore[index]


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_template_options_reach_the_template(served: Server) -> None:
    """vLLM's add_generation_prompt, continue_final_message and chat_template_kwargs, in /tokenize and in chat;
    /tokenize counts tools as the chat request's prompt_tokens does."""
    _, tok = _model(served.model)
    url, model = served.base_url, served.model

    def tokens(**fields: object) -> list[int]:
        resp = httpx.post(f"{url}/tokenize", json={"model": model, **fields}, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()["tokens"]

    ask = [{"role": "user", "content": "weather in Oslo?"}]
    with_tools = tokens(messages=ask, tools=[WEATHER])
    chat = served.client().chat.completions.create(model=model, messages=ask, tools=[WEATHER], max_tokens=1)
    assert chat.usage is not None and len(with_tools) == chat.usage.prompt_tokens > len(tokens(messages=ask))
    draft = [*ask, {"role": "assistant", "content": "It is"}]
    assert tokens(messages=draft, add_generation_prompt=False, continue_final_message=True) == \
        tok.apply_chat_template(draft, continue_final_message=True, return_dict=False)
    assert tokens(messages=ask, add_generation_prompt=False) == tok.apply_chat_template(ask, return_dict=False)
    assert tokens(messages=ask, chat_template_kwargs={"bos_token": ""}) == tokens(messages=ask)[1:]  # a variable
    went_on = served.client().chat.completions.create(
        model=model, messages=draft, max_tokens=4, seed=1,  # type: ignore[arg-type]
        extra_body={"add_generation_prompt": False, "continue_final_message": True, "echo": True})
    assert (went_on.choices[0].message.content or "").startswith("It is")
    for fields, param in (({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
                          ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools")):
        bad = httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": draft, "max_tokens": 2,
                                                             **fields}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"messages": [{"role": "pirate", "content": "x"}]}, 400, "messages[0].role"),
    ("/detokenize", {"tokens": [99999]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
    ("/detokenize", {"tokens": [1], "model": "nope"}, 404, "model"),
])
def test_bad_tokenize_requests(served: Server, path: str, body: dict, status: int, param: str) -> None:
    resp = httpx.post(f"{served.base_url}{path}", json={"model": served.model, **body}, timeout=30)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param


@pytest.mark.parametrize("stream", [False, True])
def test_a_finished_completion_is_logged_as_done(served: Server, stream: bool) -> None:
    """The request log says how a legacy completion ended, as for chat (it said "client went away")."""
    rid = f"legacy-log-{stream}"
    client = served.client(default_headers={"X-Request-Id": rid, "Cache-Control": "no-store"})
    response = client.completions.create(model=served.model, prompt=PROMPTS[0], temperature=0, max_tokens=3,
                                         stream=stream)
    if stream:
        list(response)
    deadline = time.monotonic() + 5
    while f"request {rid}." not in served.procs[0].log() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(x for x in served.procs[0].log().splitlines() if f"request {rid}." in x)
    assert "done finish=length" in line and "completion=3" in line
