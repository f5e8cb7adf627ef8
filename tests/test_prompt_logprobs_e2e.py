"""Prompt log probabilities through the official openai SDK: legacy `echo` with `logprobs` (how lm-evaluation-harness
scores log-likelihoods), `max_tokens: 0`, and vLLM's `prompt_logprobs`, checked against the model's own logits."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tests.conftest import Server
from tests.test_chat_e2e import _model

PROMPT = "The ships sailed under the stars and"


def reference(model_dir: str, ids: list[int]) -> tuple[list[float], list[int]]:
    """Each prompt token's logprob given those before it (from the second on), and the likeliest token there."""
    model, _ = _model(model_dir)
    with torch.inference_mode():
        log_probs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    rows = log_probs[:-1]
    chosen = rows.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return chosen.tolist(), rows.argmax(-1).tolist()


def prompt_ids(model_dir: str) -> list[int]:
    return list(_model(model_dir)[1](PROMPT)["input_ids"])


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_reads_it(served: Server) -> None:
    ids = prompt_ids(served.model)
    expected, best = reference(served.model, ids)
    # lm-evaluation-harness's `local-completions` loglikelihood request, as it sends it.
    resp = served.client().completions.create(model=served.model, prompt=ids, temperature=0, max_tokens=1,
                                              logprobs=1, echo=True, seed=1234)
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.tokens is not None and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    _, tok = _model(served.model)
    for position, (top, logprob) in enumerate(zip(lp.top_logprobs[1:len(ids)], lp.token_logprobs[1:len(ids)],
                                                  strict=True)):
        assert lp.tokens[position + 1] in top and top[lp.tokens[position + 1]] == pytest.approx(logprob)
        greedy = best[position] == ids[position + 1]
        assert (logprob == pytest.approx(max(top.values()))) == greedy  # lm-eval's `is_greedy`
    assert resp.choices[0].text.startswith(tok.decode(ids))
    assert resp.usage is not None and resp.usage.completion_tokens == 1


def test_max_tokens_0_with_echo_scores_the_prompt_only(served: Server) -> None:
    ids = prompt_ids(served.model)
    resp = served.client().completions.create(model=served.model, prompt=PROMPT, max_tokens=0, echo=True,
                                              logprobs=0)
    choice = resp.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert choice.logprobs is not None and len(choice.logprobs.tokens or []) == len(ids)
    assert resp.usage is not None and (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(ids), 0)


def test_streamed_echo_carries_the_prompts_logprobs_first(served: Server) -> None:
    ids = prompt_ids(served.model)
    chunks = list(served.client().completions.create(model=served.model, prompt=PROMPT, max_tokens=3, echo=True,
                                                     logprobs=2, temperature=0, stream=True))
    first = chunks[0].choices[0]
    assert first.text == PROMPT and first.logprobs is not None
    assert len(first.logprobs.tokens or []) == len(ids) and (first.logprobs.token_logprobs or [0])[0] is None
    expected, _ = reference(served.model, ids)
    assert (first.logprobs.token_logprobs or [])[1:] == pytest.approx(expected, abs=1e-4)
    later = [c.choices[0].logprobs for c in chunks[1:] if c.choices and c.choices[0].logprobs]
    assert sum(len(lp.tokens or []) for lp in later if lp is not None) == 3


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_vllm_prompt_logprobs(served: Server, endpoint: str) -> None:
    client = served.client()
    if endpoint == "completions":
        ids = prompt_ids(served.model)
        resp = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=2,
                                         extra_body={"prompt_logprobs": 2})
        scores = resp.model_dump()["choices"][0]["prompt_logprobs"]
        expected, _ = reference(served.model, ids)
    else:
        messages = [{"role": "user", "content": PROMPT}]
        resp = client.chat.completions.create(model=served.model, messages=messages, max_tokens=2,  # type: ignore
                                              extra_body={"prompt_logprobs": 2})
        scores = resp.model_dump()["prompt_logprobs"]
        ids = httpx.post(f"{served.base_url}/tokenize", json={"model": served.model, "messages": messages},
                         timeout=30).json()["tokens"]
        expected, _ = reference(served.model, ids)
    assert resp.usage is not None and len(scores) == len(ids) == resp.usage.prompt_tokens
    assert scores[0] is None
    for position, entry in enumerate(scores[1:]):
        own = entry[str(ids[position + 1])]
        assert own["logprob"] == pytest.approx(expected[position], abs=1e-4) and own["rank"] >= 1
        ranked = sorted((v for k, v in entry.items()), key=lambda v: -v["logprob"])
        assert 2 <= len(entry) <= 3 and ranked[0]["rank"] == 1 and all("decoded_token" in v for v in ranked)


def test_prompt_logprobs_with_stream_is_a_400(served: Server) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        served.client().chat.completions.create(model=served.model, messages=[{"role": "user", "content": "x"}],
                                                stream=True, extra_body={"prompt_logprobs": 1})
    assert caught.value.body["param"] == "prompt_logprobs"  # type: ignore[index]
