"""Decoding one step ahead (DECODE_AHEAD, workers/chat/ahead.py), run on the CPU's static path: the tokens, texts
and finish reasons must be those of decoding one step at a time, whatever joins, leaves or needs the host."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.protocol import ChatJob, ChatMessage, Delta, Finished, SamplingParams
from tests.test_decode_graphs import PROMPTS, HostReads, drive, greedy_ids
from workers.chat.engine import ChatEngine, Sequence


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def engine_for(loaded: tuple, ahead: bool) -> ChatEngine:
    model, tok = loaded
    return ChatEngine(model, tok, torch.device("cpu"), 4096, decode_graphs="on", max_batch_size=8, decode_ahead=ahead)


def job(prompt: str, rid: str, **params: object) -> ChatJob:
    return ChatJob(request_id=rid, model="m", messages=[ChatMessage("user", prompt)],
                   params=SamplingParams(**{"temperature": 0.0, "max_tokens": 24, **params}), created=0.0)


def run(engine: ChatEngine, jobs: list[ChatJob], join_every: int, cancel: str | None = None) -> dict[str, list]:
    """Each request's events, in order; `cancel` is cancelled before the seventh step."""
    out: dict[str, list] = {}
    for seq, event in drive(engine, jobs, join_every, lambda step: step == 6 and cancel and engine.cancel(cancel)):
        out.setdefault(seq.request_id, []).append(event)
    return out


@pytest.mark.parametrize("join_every", [0, 1, 3])
def test_greedy_ahead_equals_generate_as_sequences_join_and_leave(loaded: tuple, join_every: int) -> None:
    engine = engine_for(loaded, True)
    jobs = [job(p, str(i), max_tokens=10 + 7 * i, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    got = run(engine, jobs, join_every)
    for i in range(len(PROMPTS)):
        assert isinstance(got[str(i)][-1], Finished) and got[str(i)][-1].completion_tokens == 10 + 7 * i
    outputs = {s.request_id: s.output_ids for s in engine.released}
    for i, p in enumerate(PROMPTS):
        assert outputs[str(i)] == greedy_ids(loaded, p, 10 + 7 * i), f"request {i} ({join_every=})"
    assert engine.steps_ahead > 0.8 * engine.decode_steps
    assert engine.active == 0 and engine._inflight is None


MIXED = [
    job(PROMPTS[0], "greedy", max_tokens=40),
    job(PROMPTS[5], "cancelled", max_tokens=40, ignore_eos=True),
    job(PROMPTS[1], "min-tokens", min_tokens=12, max_tokens=36),
    job(PROMPTS[4], "one", max_tokens=1),
    job(PROMPTS[3], "stop", stop=["e"], max_tokens=40),
    job(PROMPTS[2], "sampled", temperature=1.0, top_p=0.8, seed=3, max_tokens=10),
    job(PROMPTS[5], "logprobs", logprobs=True, top_logprobs=2, max_tokens=8),
    job(PROMPTS[1], "penalty", presence_penalty=1.5, max_tokens=10),
]


@pytest.mark.parametrize("join_every", [0, 2])
def test_ahead_gives_the_events_of_one_step_at_a_time(loaded: tuple, join_every: int) -> None:
    """Differential: the same arrivals with and without decoding ahead give the same events for every request,
    including the ones that need the host (sampling, logprobs, penalties: the engine settles for them) and
    those that finish early (max_tokens 1, a stop string); one request is cancelled midway (its events up to
    the cancel agree)."""
    ahead = engine_for(loaded, True)
    got = run(ahead, MIXED, join_every, cancel="cancelled")
    want = run(engine_for(loaded, False), MIXED, join_every, cancel="cancelled")
    cut, whole = got.pop("cancelled"), want.pop("cancelled")
    assert got == want
    # A cancel lands between steps; ahead, the step in flight then is dropped, so one token fewer arrives.
    assert 0 < len(cut) <= len(whole) and cut == whole[: len(cut)]
    assert ahead.steps_ahead > 0 and ahead.active == 0 and ahead._inflight is None
    assert all(isinstance(e, Delta | Finished) for events in got.values() for e in events)


def test_a_launch_ahead_reads_nothing_back_to_the_host(loaded: tuple) -> None:
    engine = engine_for(loaded, True)
    for i, p in enumerate(PROMPTS[:3]):
        seq = engine.prepare(job(p, str(i), ignore_eos=True))
        assert isinstance(seq, Sequence)
        engine.add(seq)
    engine.step()
    engine.step()
    engine.step()
    assert engine._inflight is not None  # a step is in flight; the next one launches before it is read
    probe = HostReads()
    with torch.inference_mode(), probe:
        step = engine._launch()
    assert probe.seen == [] and len(step.seqs) == 3


def test_min_tokens_bans_count_the_token_in_flight(loaded: tuple) -> None:
    """Ahead, a row's last token is still in flight when its next one is picked: with min_tokens 3 and two tokens
    recorded, end-of-turn is banned for a row with nothing in flight (index 2) but allowed for one with a token
    in flight (index 3)."""
    engine = engine_for(loaded, True)
    rows = []
    for rid in ("settled", "in-flight"):
        seq = engine.prepare(job(PROMPTS[0], rid, min_tokens=3))
        assert isinstance(seq, Sequence)
        seq.output_ids = [5, 6]
        rows.append(seq)
    eos = engine.eos_ids[0]
    logits = torch.zeros((2, engine.vocab_size))
    logits[:, eos] = 10.0
    logits[:, 7] = 5.0
    picked = engine._pick(logits, engine._bans(rows, {id(rows[1])}, logits.device))
    assert picked.tolist() == [7, eos]
    assert logits[0, eos] == 10.0  # the caller's logits are left as they were
