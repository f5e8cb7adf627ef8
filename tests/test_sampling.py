"""Per-request sampling depth in the engine: logprobs, penalties, logit_bias, min_p, stop_token_ids, n."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.protocol import ChatJob, ChatMessage, Finished, SamplingParams
from workers.chat.engine import ChatEngine, Sequence

PROMPT = "Tell me a story about the sea and the stars"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def run(loaded: tuple, n: int = 1, **params: object) -> tuple[list[Sequence], list]:
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096)
    job = ChatJob(request_id="r", model="m", messages=[ChatMessage("user", PROMPT)], n=n,
                  params=SamplingParams(**{"temperature": 0.0, "max_tokens": 12, **params}), created=0.0)
    first = engine.prepare(job)
    assert isinstance(first, Sequence)
    engine.add(first)
    events = []
    while engine.active:
        events += [e for _, e in engine.step()]
    return [first, *first.siblings], events


def generate(loaded: tuple, n: int = 12, **kwargs: object):
    model, tok = loaded
    enc = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        return model.generate(**enc, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                              output_logits=True, **kwargs), enc["input_ids"].shape[1]


def test_logprobs_match_the_raw_distribution(loaded: tuple) -> None:
    (seq,), events = run(loaded, logprobs=True, top_logprobs=3)
    out, plen = generate(loaded)
    assert seq.output_ids == out.sequences[0, plen:].tolist()
    entries = [lp for e in events for lp in (e.logprobs or [])]
    assert len(entries) == 12
    for entry, logits, token in zip(entries, out.logits, seq.output_ids, strict=True):
        expected = torch.log_softmax(logits[0].float(), dim=-1)
        assert entry.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy picked the top
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_repetition_penalty_equals_transformers(loaded: tuple) -> None:
    (seq,), _ = run(loaded, repetition_penalty=1.5)
    out, plen = generate(loaded, repetition_penalty=1.5)
    assert seq.output_ids == out.sequences[0, plen:].tolist()


def test_min_p_one_keeps_only_the_top_token(loaded: tuple) -> None:
    (greedy,), _ = run(loaded)
    (sampled,), _ = run(loaded, temperature=1.0, min_p=1.0, seed=3)
    assert sampled.output_ids == greedy.output_ids


def test_logit_bias_forces_and_forbids(loaded: tuple) -> None:
    (greedy,), _ = run(loaded)
    (forced,), _ = run(loaded, logit_bias={100: 100.0})
    assert forced.output_ids == [100] * 12
    (banned,), _ = run(loaded, logit_bias={greedy.output_ids[0]: -100.0})
    assert banned.output_ids[0] != greedy.output_ids[0]


def test_presence_and_frequency_penalties_discourage_repeats(loaded: tuple) -> None:
    (plain,), _ = run(loaded, logit_bias={100: 8.0}, max_tokens=20)
    (penalised,), _ = run(loaded, logit_bias={100: 8.0}, max_tokens=20, frequency_penalty=2.0, presence_penalty=2.0)
    assert plain.output_ids.count(100) > penalised.output_ids.count(100) >= 1


def test_stop_token_ids_end_with_stop_and_leave_no_text(loaded: tuple) -> None:
    (greedy,), _ = run(loaded)
    target = greedy.output_ids[3]
    first = greedy.output_ids.index(target)
    (seq,), events = run(loaded, stop_token_ids=[target])
    assert seq.output_ids == greedy.output_ids[:first + 1]
    assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == first + 1
    (held,), _ = run(loaded, stop_token_ids=[target], min_tokens=first + 2)
    assert len(held.output_ids) >= first + 2 and target not in held.output_ids[:first + 2]


def test_n_choices_are_indexed_reproducible_and_share_a_job(loaded: tuple) -> None:
    seqs, events = run(loaded, n=3, temperature=1.0, seed=11)
    assert [s.index for s in seqs] == [0, 1, 2] and len({id(s.group) for s in seqs}) == 1
    finished = [e for e in events if isinstance(e, Finished)]
    assert sorted(e.index for e in finished) == [0, 1, 2]
    for i in range(3):  # each choice numbers its events by token index, as a resumed job replays them
        mine = [e.seq for e in events if e.index == i]
        assert mine == list(range(len(mine)))
    for i, seq in enumerate(seqs):
        (alone,), _ = run(loaded, temperature=1.0, seed=11 + i)
        assert seq.output_ids == alone.output_ids
    assert len({tuple(s.output_ids) for s in seqs}) > 1


def test_a_seeded_request_resumed_after_a_crash_goes_on_as_it_would_have(loaded: tuple) -> None:
    """A worker that takes a job over replays the tokens the dead one recorded and samples the rest: with a seed,
    the rest must be what the first worker would have drawn (each draw is seeded by the seed and its position)."""
    model, tok = loaded
    params = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 20, "seed": 5, "ignore_eos": True}
    (whole,), _ = run(loaded, **params)
    for recorded in (1, 7, 19):
        engine = ChatEngine(model, tok, torch.device("cpu"), 4096)
        job = ChatJob(request_id="r", model="m", messages=[ChatMessage("user", PROMPT)],
                      params=SamplingParams(**params), created=0.0)
        seq = engine.prepare(job)
        assert isinstance(seq, Sequence)
        seq.resume = whole.output_ids[:recorded]
        engine.add(seq)
        while engine.active:
            engine.step()
        assert seq.output_ids == whole.output_ids, recorded
    (other,), _ = run(loaded, **{**params, "seed": 6})
    assert other.output_ids != whole.output_ids
