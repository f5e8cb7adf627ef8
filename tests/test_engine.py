"""The batching engine in-process, against `model.generate` on the same weights (no Redis, no HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.protocol import ChatJob, ChatMessage, Delta, Failed, Finished, SamplingParams
from workers.chat.engine import ChatEngine, Sequence
from workers.chat.kv import padding_groups

PROMPTS = ["Hello there", "Tell me a story about the sea and the stars", "x", "What is two plus two? Be brief."]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(params=["off", "on"])
def engine(loaded: tuple, request: pytest.FixtureRequest) -> ChatEngine:
    """Eager, and the static path CUDA graphs replay (run without capture here: workers/chat/graphs.py)."""
    model, tok = loaded
    return ChatEngine(model, tok, torch.device("cpu"), 4096, decode_graphs=request.param, max_batch_size=8)


def job(prompt: str, rid: str, **params: object) -> ChatJob:
    return ChatJob(request_id=rid, model="m", messages=[ChatMessage("user", prompt)],
                   params=SamplingParams(**{"temperature": 0.0, **params}), created=0.0)


def greedy_ids(loaded: tuple, prompt: str, n: int) -> list[int]:
    model, tok = loaded
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def admit(engine: ChatEngine, j: ChatJob) -> Sequence:
    seq = engine.prepare(j)
    assert isinstance(seq, Sequence)
    engine.add(seq)
    return seq


def drain(engine: ChatEngine, results: dict[str, list]) -> None:
    for seq, event in engine.step():
        results.setdefault(seq.request_id, []).append(event)


@pytest.mark.parametrize("join_every", [0, 1, 2, 5])
def test_greedy_identical_alone_or_joining_a_busy_batch(engine: ChatEngine, loaded: tuple, join_every: int) -> None:
    """join_every=0: all four arrive together and share one left-padded prefill pass."""
    results: dict[str, list] = {}
    seqs = []
    for i, prompt in enumerate(PROMPTS):
        seqs.append(admit(engine, job(prompt, str(i), max_tokens=12 + 4 * i)))
        for _ in range(join_every):
            drain(engine, results)
    while engine.active:
        drain(engine, results)
    for i, (prompt, seq) in enumerate(zip(PROMPTS, seqs, strict=True)):
        assert seq.output_ids == greedy_ids(loaded, prompt, 12 + 4 * i)
        events = results[str(i)]
        assert isinstance(events[-1], Finished) and events[-1].finish_reason == "length"
        assert [e.seq for e in events] == list(range(len(events)))
    assert engine.rows == [] and len(engine.released) == len(PROMPTS)


def test_mixed_parameters_in_one_batch(engine: ChatEngine, loaded: tuple) -> None:
    _, tok = loaded
    reference = greedy_ids(loaded, PROMPTS[1], 30)
    ref_text = tok.decode(reference, skip_special_tokens=True)
    stop = next(ref_text[i:i + 2] for i in range(6, len(ref_text)) if ref_text[i:i + 2].isascii()
                and ref_text[i:i + 2].strip())
    greedy = admit(engine, job(PROMPTS[1], "greedy", max_tokens=30))
    one = admit(engine, job(PROMPTS[0], "one", max_tokens=1))
    admit(engine, job(PROMPTS[1], "stop", max_tokens=30, stop=[stop]))
    sampled = admit(engine, job(PROMPTS[2], "sampled", temperature=1.0, top_p=0.9, top_k=20, seed=5, max_tokens=8))
    results: dict[str, list] = {}
    while engine.active:
        drain(engine, results)
    assert greedy.output_ids == reference
    assert len(one.output_ids) == 1 and results["one"][-1].finish_reason == "length"
    stop_text = "".join(e.text for e in results["stop"])
    assert stop_text == ref_text[:ref_text.find(stop)] and results["stop"][-1].finish_reason == "stop"
    assert len(sampled.output_ids) == 8


def test_eos_min_tokens_and_ignore_eos(engine: ChatEngine, loaded: tuple) -> None:
    reference = greedy_ids(loaded, PROMPTS[0], 10)
    engine.eos_ids = [reference[2]]  # pretend the third greedy token ends the turn
    plain = admit(engine, job(PROMPTS[0], "plain", max_tokens=10))
    at_least = admit(engine, job(PROMPTS[0], "min", max_tokens=10, min_tokens=6))
    ignoring = admit(engine, job(PROMPTS[0], "ignore", max_tokens=10, ignore_eos=True))
    results: dict[str, list] = {}
    while engine.active:
        drain(engine, results)
    assert plain.output_ids == reference[:3] and results["plain"][-1].finish_reason == "stop"
    assert results["plain"][-1].completion_tokens == 3
    assert len(at_least.output_ids) >= 6 and reference[2] not in at_least.output_ids[:6]
    assert len(ignoring.output_ids) == 10 and results["ignore"][-1].finish_reason == "length"


def test_cancelled_sequence_leaves_and_frees_its_slot(engine: ChatEngine) -> None:
    keep = admit(engine, job(PROMPTS[0], "keep", max_tokens=6))
    gone = admit(engine, job(PROMPTS[1], "gone", max_tokens=50))
    results: dict[str, list] = {}
    drain(engine, results)
    engine.cancel("gone")
    drain(engine, results)
    assert gone not in engine.rows and gone in engine.released
    while engine.active:
        drain(engine, results)
    assert engine.active == 0 and keep.finish_reason == "length"
    assert all(isinstance(e, Delta | Finished) for e in results["keep"])


def test_context_limit_is_refused_at_admission(loaded: tuple) -> None:
    model, tok = loaded
    small = ChatEngine(model, tok, torch.device("cpu"), 64)
    refused = small.prepare(job("word " * 80, "long"))
    assert isinstance(refused, Failed) and refused.code == "context_length_exceeded" and refused.status == 400
    assert isinstance(small.prepare(job("hi", "ok", max_tokens=64)), Failed)
    seq = small.prepare(job("hi", "ok"))
    assert isinstance(seq, Sequence) and seq.max_new_tokens == 64 - len(seq.prompt_ids)


LONG_SYSTEM = "You are a careful assistant who answers questions about ships, stars and numbers. " * 6


def chat_ids(loaded: tuple, messages: list[dict], n: int) -> list[int]:
    model, tok = loaded
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def system_job(user: str, rid: str) -> ChatJob:
    return ChatJob(request_id=rid, model="m", messages=[ChatMessage("system", LONG_SYSTEM), ChatMessage("user", user)],
                   params=SamplingParams(temperature=0.0, max_tokens=10), created=0.0)


@pytest.mark.parametrize(("chunk", "graphs"), [(512, "off"), (7, "off"), (512, "on"), (7, "on")])
def test_prefix_reuse_and_chunked_prefill_keep_greedy_output(loaded: tuple, chunk: int, graphs: str) -> None:
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, prefill_chunk_tokens=chunk, prefill_idle_tokens=chunk,
                        prefix_cache_tokens=4096, decode_graphs=graphs, max_batch_size=4)
    results: dict[str, list] = {}
    seqs = []
    for i, user in enumerate(["first question", "second question", "a third, longer question about ships"]):
        seqs.append(admit(engine, system_job(user, str(i))))
        while engine.active:
            drain(engine, results)
    assert seqs[0].cached_tokens == 0
    assert seqs[1].cached_tokens >= 96 and seqs[2].cached_tokens >= 96
    assert results["1"][-1].cached_tokens == seqs[1].cached_tokens
    assert engine.prefix_cache.hits == 2
    for seq, user in zip(seqs, ["first question", "second question", "a third, longer question about ships"],
                         strict=True):
        messages = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": user}]
        assert seq.output_ids == chat_ids(loaded, messages, 10)


@pytest.mark.parametrize("graphs", ["off", "on"])
def test_prompts_continuing_cached_prefixes_prefill_in_one_pass(loaded: tuple, graphs: str) -> None:
    """Requests that hit the prefix cache and arrive together share one forward pass with a fresh one, as fresh
    prompts do; rests of different lengths are right-aligned, the shorter ones recomputing a few cached positions
    instead of padding. Greedy output stays equal to `generate`'s."""
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, prefix_cache_tokens=4096, decode_graphs=graphs,
                        max_batch_size=8)
    results: dict[str, list] = {}
    admit(engine, system_job("first question", "warm"))
    while engine.active:
        drain(engine, results)
    users = ["second question", "a third, much longer question about ships and the stars above them", "ok"]
    seqs = [admit(engine, system_job(user, f"s{i}")) for i, user in enumerate(users)]
    fresh = admit(engine, job(PROMPTS[1], "fresh", max_tokens=10))
    passes: list[int] = []
    hook = model.register_forward_hook(lambda module, args, out: passes.append(1))
    try:
        engine.prefill_step()
    finally:
        hook.remove()
    assert len(passes) == 1
    assert all(len(s.output_ids) == 1 for s in [*seqs, fresh])
    assert all(s.cached_tokens >= 96 for s in seqs) and fresh.cached_tokens == 0
    while engine.active:
        drain(engine, results)
    for seq, user in zip(seqs, users, strict=True):
        messages = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": user}]
        assert seq.output_ids == chat_ids(loaded, messages, 10)
    assert fresh.output_ids == greedy_ids(loaded, PROMPTS[1], 10)


@pytest.mark.parametrize("mode", ["eager", "graphs", "ahead"])
def test_a_finished_sequences_output_is_cached_for_the_next_turn(loaded: tuple, mode: str) -> None:
    """A finished sequence's blocks, its output included, stay in the prefix cache: a next turn that sends the
    answer back inside its prompt reuses it, not only the first turn's prompt. Eagerly, from the static buffers
    the decode graphs replay, and with a step launched ahead (which has fed the last token too). Token-id prompts
    (legacy completions), so the answer comes back as the very tokens generated (a random model's text may not
    re-tokenize to them). Greedy output stays equal to `generate`'s."""
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, prefix_cache_tokens=4096,
                        decode_graphs="off" if mode == "eager" else "on", max_batch_size=4,
                        decode_ahead=mode == "ahead")
    results: dict[str, list] = {}

    def raw(rid: str, ids: list[int], n: int) -> Sequence:
        return admit(engine, ChatJob(request_id=rid, model="m", messages=[], prompt_ids=ids, created=0.0,
                                     params=SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)))

    first = raw("t1", tok(LONG_SYSTEM)["input_ids"][:40], 40)
    while engine.active:
        drain(engine, results)
    follow_up = first.prompt_ids + first.output_ids + tok(" and then?")["input_ids"]
    second = raw("t2", follow_up, 8)
    while engine.active:
        drain(engine, results)
    assert engine.steps_ahead > 0 if mode == "ahead" else engine.steps_ahead == 0
    # The last token was sampled, never fed; ahead, the step launched before its sequence was seen to end fed it.
    computed = len(first.prompt_ids) + len(first.output_ids) - (0 if mode == "ahead" else 1)
    assert second.cached_tokens == computed // 16 * 16 > len(first.prompt_ids)
    with torch.inference_mode():
        reference = model.generate(torch.tensor([follow_up]), attention_mask=torch.ones(1, len(follow_up),
                                   dtype=torch.long), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert second.output_ids == reference[0, len(follow_up):].tolist()


@pytest.mark.parametrize("mode", ["eager", "graphs", "ahead"])
def test_answers_that_left_a_busy_batch_are_cached_at_their_own_positions(loaded: tuple, mode: str) -> None:
    """Sequences of different lengths join a running batch at different steps and leave it at different steps
    (reusing freed slots of the static buffers, after wider rows moved the shared column past older ones): the
    blocks each one leaves hold its own keys and values, as a fresh forward pass over its prompt and answer
    computes them, not a neighbour's columns or a gap's."""
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, prefix_cache_tokens=8192,
                        decode_graphs="off" if mode == "eager" else "on", max_batch_size=4,
                        decode_ahead=mode == "ahead")
    results: dict[str, list] = {}
    text = tok(LONG_SYSTEM)["input_ids"]
    shapes = [(35, 30), (20, 16), (50, 24), (27, 18), (44, 9)]  # (prompt tokens, answer tokens)
    firsts = []
    for i, (n, answer) in enumerate(shapes):
        firsts.append(admit(engine, ChatJob(request_id=f"a{i}", model="m", messages=[], prompt_ids=text[i:i + n],
                                            created=0.0, params=SamplingParams(temperature=0.0, max_tokens=answer,
                                                                               ignore_eos=True))))
        for _ in range(3 + 2 * i):
            drain(engine, results)
    while engine.active:
        drain(engine, results)
    for i, first in enumerate(firsts):
        ids = first.prompt_ids + first.output_ids
        computed = len(ids) - (0 if mode == "ahead" else 1)  # ahead, the last token was fed too
        cache, cached = engine.prefix_cache.lookup([*ids, 0], model.config)
        assert cached == computed // 16 * 16 > len(first.prompt_ids) // 16 * 16, (i, cached, computed)
        with torch.inference_mode():
            fresh = model(torch.tensor([ids[:cached]]), use_cache=True).past_key_values
        for mine, theirs in zip(cache.layers, fresh.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-4, atol=1e-4)


def test_prompts_arriving_with_one_new_prefix_compute_it_once(loaded: tuple) -> None:
    """Four prompts that open with the same 64 uncached tokens arrive at an idle engine together: the first
    prefills alone, the others wait one step and continue from its cached blocks (computing the 64 tokens once,
    not four times). Greedy output stays equal to `generate`'s."""
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, prefix_cache_tokens=4096)
    text = tok(LONG_SYSTEM)["input_ids"]
    header = text[:64]
    prompts = [header + text[64 + 9 * i:73 + 9 * i] for i in range(4)]
    seqs = [admit(engine, ChatJob(request_id=f"s{i}", model="m", messages=[], prompt_ids=ids, created=0.0,
                                  params=SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)))
            for i, ids in enumerate(prompts)]
    results: dict[str, list] = {}
    drain(engine, results)
    assert engine.prefilled_tokens == len(prompts[0]) and len(engine.pending) == 3
    while engine.active:
        drain(engine, results)
    assert [s.cached_tokens for s in seqs] == [0, 64, 64, 64]
    assert engine.prefilled_tokens == len(prompts[0]) + 3 * 9
    for seq, ids in zip(seqs, prompts, strict=True):
        with torch.inference_mode():
            reference = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert seq.output_ids == reference[0, len(ids):].tolist()


def test_a_long_prompt_does_not_pad_short_ones_to_its_length(loaded: tuple) -> None:
    """Prompts arriving together prefill in passes of like length: one long prompt with several short ones takes
    two passes (the long one with a short one, then the rest), not one pass padding every short prompt to the long
    one's length. Greedy output stays equal to `generate`'s."""
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, prefill_idle_tokens=4096)
    results: dict[str, list] = {}
    long_prompt = "ships and stars " * 60
    prompts = [long_prompt, *PROMPTS]
    seqs = [admit(engine, job(p, f"p{i}", max_tokens=6)) for i, p in enumerate(prompts)]
    passes: list[int] = []
    hook = model.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[0] if args else 0))
    try:
        engine.prefill_step()
    finally:
        hook.remove()
    assert len(passes) == 2 and all(len(s.output_ids) == 1 for s in seqs)
    while engine.active:
        drain(engine, results)
    for seq, prompt in zip(seqs, prompts, strict=True):
        assert seq.output_ids == greedy_ids(loaded, prompt, 6)


def test_padding_groups_keep_like_lengths_together() -> None:
    assert padding_groups([64] * 16) == [list(range(16))]
    assert padding_groups([64] * 15 + [1000]) == [[0, 15], list(range(1, 15))]
    assert padding_groups([20, 18, 25, 9]) == [[0, 1, 2, 3]]
    assert padding_groups([]) == []


def test_long_prompt_prefill_does_not_stall_running_decodes(loaded: tuple) -> None:
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, prefill_chunk_tokens=16)
    results: dict[str, list] = {}
    runner = admit(engine, job(PROMPTS[0], "runner", max_tokens=40))
    drain(engine, results)  # nothing else decodes: its prompt takes one pass (PREFILL_IDLE_TOKENS), not 16-token chunks
    assert len(runner.output_ids) == 2 and len(runner.prompt_ids) > 16
    long = admit(engine, system_job("long one", "long"))
    steps_to_prefill = 0
    while long.computed < len(long.prompt_ids):
        before = len(runner.output_ids)
        drain(engine, results)
        steps_to_prefill += 1
        assert len(runner.output_ids) == before + 1  # the running sequence decoded a token in this step
    assert steps_to_prefill >= len(long.prompt_ids) // 16
    while engine.active:
        drain(engine, results)
    assert runner.output_ids == greedy_ids(loaded, PROMPTS[0], 40)


def test_idle_worker_prefills_a_burst_in_one_pass(loaded: tuple) -> None:
    """With nothing decoding, the prefill budget is PREFILL_IDLE_TOKENS: four prompts that arrive together at an
    idle engine get their first tokens in one step and then decode in step; two more arriving while they decode
    get PREFILL_CHUNK_TOKENS only. Greedy output is unchanged either way."""
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, prefill_chunk_tokens=8, prefill_idle_tokens=4096)
    results: dict[str, list] = {}
    burst = [admit(engine, job(p, f"b{i}", max_tokens=12)) for i, p in enumerate(PROMPTS)]
    assert sum(len(s.prompt_ids) for s in burst) > 8
    drain(engine, results)
    assert [len(s.output_ids) for s in burst] == [2, 2, 2, 2]  # the first token from the prefill, one decoded
    late = [admit(engine, job(p, f"l{i}", max_tokens=12)) for i, p in enumerate(PROMPTS[:2])]
    assert all(len(s.prompt_ids) > 8 for s in late)
    drain(engine, results)
    assert [s.computed for s in late] == [8, 0]  # one 8-token chunk of the first; the second waits
    while engine.active:
        drain(engine, results)
    for s, prompt in zip(burst + late, PROMPTS + PROMPTS[:2], strict=True):
        assert s.output_ids == greedy_ids(loaded, prompt, 12)


def test_prefix_cache_evicts_least_recently_used(loaded: tuple) -> None:
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, prefix_cache_tokens=64)
    seq = admit(engine, system_job("hello", "a"))
    while engine.active:
        engine.step()
    assert len(engine.prefix_cache) == 4  # capacity: 64 tokens = 4 blocks of 16
    assert engine.prefix_cache.nbytes > 0
    again = admit(engine, system_job("hello", "b"))
    while engine.active:
        engine.step()
    assert again.cached_tokens == 64 and again.output_ids == seq.output_ids
