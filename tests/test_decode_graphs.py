"""The static-buffer decoding path that CUDA graphs replay (workers/chat/graphs.py), run eagerly on the CPU.

Capture itself needs a GPU (bench/engine_check.py checks it there); what runs here is everything else: the copy
of the batch into the buffers and back whenever a sequence joins or leaves, the bucket switches as the context
grows, the fall-back to eager decoding past GRAPH_MAX_LEN, and that a step never reads a value back to the host
(which would fail capture on a GPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.protocol import ChatJob, ChatMessage, Event, Finished, SamplingParams
from devtools.families import FAMILIES, build_family_model
from tests.test_sliding_window import PROMPTS as LONG_PROMPTS
from tests.test_sliding_window import WINDOW, _engine_outputs, _generate
from workers.chat.engine import ChatEngine, Sequence
from workers.chat.loader import load_causal_lm

PROMPTS = ["Hello there", "Tell me a story about the sea and the stars", "x", "What is two plus two? Be brief.",
           "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12", "Weather report"]
# Ops that copy a device value to the host: each one synchronises, and during capture it is an error.
HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
              "aten.equal.default", "aten.item.default"}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def job(prompt: str, rid: str, max_tokens: int) -> ChatJob:
    return ChatJob(request_id=rid, model="m", messages=[ChatMessage("user", prompt)],
                   params=SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), created=0.0)


def greedy_ids(loaded: tuple, prompt: str, n: int) -> list[int]:
    model, tok = loaded
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def drive(engine: ChatEngine, jobs: list[ChatJob], join_every: int,
          before_step: Callable[[int], None] | None = None) -> Iterator[tuple[Sequence, Event]]:
    """Admit one job every `join_every` steps (0: all at once) until all are done; every event, in order."""
    queue, steps = list(jobs), 0
    while queue or engine.active:
        if queue and (join_every == 0 or steps % join_every == 0):
            for j in queue if join_every == 0 else queue[:1]:
                seq = engine.prepare(j)
                assert isinstance(seq, Sequence)
                engine.add(seq)
            queue = [] if join_every == 0 else queue[1:]
        if before_step is not None:
            before_step(steps)
        yield from engine.step()
        steps += 1


def run(engine: ChatEngine, jobs: list[ChatJob], join_every: int) -> dict[str, list[int]]:
    """Each request's tokens."""
    return {seq.request_id: list(seq.output_ids) for seq, event in drive(engine, jobs, join_every)
            if isinstance(event, Finished)}


@pytest.mark.parametrize("join_every", [0, 1, 3])
def test_static_path_equals_generate_as_sequences_join_and_leave(loaded: tuple, join_every: int) -> None:
    """Lengths 20..145: the batch crosses the 128-position bucket, and rows of 1..6 cross the row buckets."""
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, decode_graphs="on", max_batch_size=8)
    jobs = [job(p, str(i), 20 + 25 * i) for i, p in enumerate(PROMPTS)]
    got = run(engine, jobs, join_every)
    for i, p in enumerate(PROMPTS):
        assert got[str(i)] == greedy_ids(loaded, p, 20 + 25 * i), f"request {i} ({join_every=})"
    assert engine.graphs is not None and engine.graphs.replays > 0.9 * engine.decode_steps
    assert engine.active == 0 and not engine.graphs.holding and engine.kv_bytes() == 0


def test_buckets_built_ahead_at_warm_up_serve_the_same_tokens(loaded: tuple) -> None:
    """The worker's warm-up builds every bucket before the first request (on CUDA: captures them)."""
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, decode_graphs="on", graph_max_len=256,
                        max_batch_size=4)
    assert engine.prefill_graphs is not None
    prefill = [(r, n) for r in (1, 2, 4) for n in (16, 32, 64, 128, 256)]
    assert engine.prefill_graphs.buckets == sorted(prefill, key=lambda b: (b[0] * b[1], b[1]))
    assert engine.capture_graphs() == 3 * 2 + len(prefill)  # decode: rows 1, 2, 4 x lengths 128, 256
    assert engine.capture_graphs() == 0
    jobs = [job(p, str(i), 30 + 40 * i) for i, p in enumerate(PROMPTS[:4])]
    got = run(engine, jobs, 1)
    for i, p in enumerate(PROMPTS[:4]):
        assert got[str(i)] == greedy_ids(loaded, p, 30 + 40 * i)
    assert engine.graphs is not None and engine.graphs.replays == engine.decode_steps


def test_past_graph_max_len_decoding_goes_on_eagerly(loaded: tuple) -> None:
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, decode_graphs="on", graph_max_len=64,
                        max_batch_size=2)
    jobs = [job(p, str(i), 60) for i, p in enumerate(PROMPTS[:3])]  # 3 rows > 2: eager until one leaves
    got = run(engine, jobs, 2)
    for i, p in enumerate(PROMPTS[:3]):
        assert got[str(i)] == greedy_ids(loaded, p, 60)
    assert engine.graphs is not None and 0 < engine.graphs.replays < engine.decode_steps


def test_off_and_auto_on_cpu_decode_eagerly(loaded: tuple) -> None:
    model, tok = loaded
    for setting in ("off", "auto"):
        assert ChatEngine(model, tok, torch.device("cpu"), 4096, decode_graphs=setting).graphs is None


class HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if str(func) in HOST_READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_static_step_reads_nothing_back_to_the_host(loaded: tuple) -> None:
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, decode_graphs="on", max_batch_size=4)
    for i, p in enumerate(PROMPTS[:3]):
        seq = engine.prepare(job(p, str(i), 10))
        assert isinstance(seq, Sequence)
        engine.add(seq)
    engine.step()
    engine.step()
    graphs = engine.graphs
    assert graphs is not None and graphs.holding
    probe = HostReads()
    with torch.inference_mode(), probe:
        logits = graphs.step([0] * graphs.rows)
    assert logits.shape[0] == 3
    assert probe.seen == []
    with torch.inference_mode(), probe:  # the probe does see a read when there is one
        int(logits[0, 0].argmax())
    assert probe.seen


def _narrow_family(tmp_path: Path, family: str):  # type: ignore[no-untyped-def]
    base = FAMILIES[family]
    folder = build_family_model(dataclasses.replace(base, config={**base.config, "sliding_window": WINDOW}),
                                tmp_path / family)
    return folder, load_causal_lm(str(folder), "cpu", dtype_name="float32")


def test_eager_attention_models_decode_eagerly(tmp_path: Path) -> None:
    """Gemma 2's eager attention adds the mask to its scores: with the static path's boolean masks it gave other
    tokens than `generate`, so the engine leaves graphs off for it."""
    folder, loaded = _narrow_family(tmp_path, "gemma2")
    engine = ChatEngine(loaded.model, loaded.tokenizer, loaded.device, 1024, decode_graphs="on", max_batch_size=4)
    assert engine.graphs is None
    assert _engine_outputs(engine, LONG_PROMPTS) == [_generate(folder, p) for p in LONG_PROMPTS]


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_sliding_window_models_take_the_static_path(tmp_path: Path, family: str) -> None:
    """A window of 8, far shorter than the prompts: Gemma 3 (sliding and full layers, masks by layer type) and
    Mistral (sliding everywhere, one mask) decode and prefill through the static path, windowed by each row's
    positions: equal to `generate` together, and when a longer prompt joins a held batch (gap columns in the
    older row, which a window over columns would get wrong)."""
    folder, loaded = _narrow_family(tmp_path, family)
    engine = ChatEngine(loaded.model, loaded.tokenizer, loaded.device, 1024, decode_graphs="on", max_batch_size=4)
    assert engine.graphs is not None and engine.graphs.attention.window == WINDOW
    expected = [_generate(folder, p) for p in LONG_PROMPTS]
    assert _engine_outputs(engine, LONG_PROMPTS) == expected
    assert engine.graphs.replays == engine.decode_steps > 0
    assert engine.prefill_graphs is not None and engine.prefill_graphs.replays > 0
    short, longer = (ChatJob(request_id=f"g{i}", model="m", messages=[ChatMessage("user", p)],
                             params=SamplingParams(temperature=0.0, max_tokens=20), created=0.0)
                     for i, p in enumerate(reversed(LONG_PROMPTS)))
    first = admit(engine, short)
    engine.step()
    engine.step()
    held = engine.graphs.length
    second = admit(engine, longer)
    engine.prefill_step()
    assert engine.graphs.length == len(second.prefill_ids) > held + 1
    while engine.active:
        engine.step()
    assert [first.output_ids, second.output_ids] == expected[::-1]
    admit(engine, short)  # and the windowed masks read nothing back to the host (a capture would fail)
    engine.step()
    probe = HostReads()
    with torch.inference_mode(), probe:
        engine.graphs.step([0])
        engine.prefill_graphs.run([first.prefill_ids, second.prefill_ids])
    assert probe.seen == []


def test_full_attention_families_keep_the_static_path(tmp_path: Path) -> None:
    folder = build_family_model(FAMILIES["qwen3"], tmp_path / "qwen3")
    loaded = load_causal_lm(str(folder), "cpu", dtype_name="float32")
    engine = ChatEngine(loaded.model, loaded.tokenizer, loaded.device, 1024, decode_graphs="on", max_batch_size=4)
    assert engine.graphs is not None
    assert _engine_outputs(engine, LONG_PROMPTS) == [_generate(folder, p) for p in LONG_PROMPTS]
    assert engine.graphs.replays == engine.decode_steps > 0


def drain(engine: ChatEngine, outputs: dict[str, list[int]]) -> None:
    while engine.active:
        for seq, event in engine.step():
            if isinstance(event, Finished):
                outputs[seq.request_id] = list(seq.output_ids)


def admit(engine: ChatEngine, j: ChatJob) -> Sequence:
    seq = engine.prepare(j)
    assert isinstance(seq, Sequence)
    engine.add(seq)
    return seq


LONG = "Numbers: " + " ".join(str(i) for i in range(1, 15))


def test_a_longer_prompt_joins_the_held_batch_in_place(loaded: tuple) -> None:
    """The batch stays in the buffers: the new prompt ends at the shared column, which moves past the older row
    (masked gap columns for it), and both still decode what `generate` gives."""
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, decode_graphs="on", max_batch_size=4)
    graphs = engine.graphs
    assert graphs is not None
    admit(engine, job("x", "short", 30))
    engine.step()
    engine.step()
    held = graphs.length
    longer = admit(engine, job(LONG, "long", 30))
    assert len(longer.prefill_ids) > held + 1
    engine.prefill_step()
    assert graphs.rows == 2 and graphs.length == len(longer.prefill_ids)
    outputs: dict[str, list[int]] = {}
    drain(engine, outputs)
    assert outputs == {"short": greedy_ids(loaded, "x", 30), "long": greedy_ids(loaded, LONG, 30)}
    assert engine.prefill_graphs is not None and engine.prefill_graphs.replays == 2
    assert graphs.replays == engine.decode_steps


def test_a_full_shared_column_compacts_the_batch_and_stays_static(loaded: tuple) -> None:
    """A long prompt that came and went left the short row with a gap; when the shared column reaches
    GRAPH_MAX_LEN the rows are gathered to the left and decoding goes on through the buffers, not eagerly."""
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, decode_graphs="on", graph_max_len=64,
                        max_batch_size=4)
    graphs = engine.graphs
    assert graphs is not None
    short = admit(engine, job("x", "short", 36))
    engine.step()
    longer = admit(engine, job(LONG, "long", 2))
    outputs: dict[str, list[int]] = {}
    drain(engine, outputs)
    assert len(longer.prefill_ids) + 36 > 64 > len(short.prompt_ids) + 36  # only the gap outgrows the buffers
    assert outputs == {"short": greedy_ids(loaded, "x", 36), "long": greedy_ids(loaded, LONG, 2)}
    assert graphs.replays == engine.decode_steps


def test_rows_prefill_eagerly_past_the_graph_prefill_buckets(loaded: tuple) -> None:
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, decode_graphs="on", graph_prefill_tokens=32,
                        max_batch_size=4)
    assert engine.prefill_graphs is not None and max(r * n for r, n in engine.prefill_graphs.buckets) <= 32
    jobs = [job(p, str(i), 12) for i, p in enumerate([LONG, "x", "Hello there"])]
    got = run(engine, jobs, 1)
    assert got == {str(i): greedy_ids(loaded, j.messages[0].content, 12) for i, j in enumerate(jobs)}
    assert 0 < engine.prefill_graphs.replays < 3


def test_a_graph_prefill_reads_nothing_back_to_the_host(loaded: tuple) -> None:
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, decode_graphs="on", max_batch_size=4)
    prefill = engine.prefill_graphs
    assert prefill is not None
    prompts = [admit(engine, job(p, str(i), 4)).prefill_ids for i, p in enumerate(PROMPTS[:3])]
    probe = HostReads()
    with torch.inference_mode(), probe:
        static, mask, logits = prefill.run(prompts)
    assert probe.seen == []
    assert logits.shape[0] == mask.shape[0] == 3 and mask.shape[1] == max(len(p) for p in prompts)
    assert static.layers[0].keys.shape[:3] == (3, model.config.num_key_value_heads, mask.shape[1])


def test_a_failed_prefill_capture_leaves_prefill_eager(loaded: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU a model whose forward cannot be captured must not stop the worker from starting."""
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, decode_graphs="on", max_batch_size=4)
    prefill = engine.prefill_graphs
    assert prefill is not None

    def fails(rows: int, length: int) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(prefill, "_build", fails)
    assert engine.capture_graphs() > 0  # the decode buckets
    assert engine.prefill_graphs is None and engine.graphs is not None
    assert run(engine, [job("Hello there", "a", 16)], 0) == {"a": greedy_ids(loaded, "Hello there", 16)}


def test_the_server_with_graphs_on_streams_what_generate_gives(tiny_model_dir: Path, tmp_path: Path,
                                                               loaded: tuple) -> None:
    """The whole path with DECODE_GRAPHS=on and DECODE_AHEAD: the worker builds every bucket at warm-up, and
    concurrent streams (joining and leaving the static batch in place, prefilled through the graph prefill,
    decoded one step ahead) arrive over SSE through the official SDK, each equal to `generate`."""
    import asyncio

    from common.redis_server import free_port
    from tests.conftest import Proc, Server, axion_env, get_json, wait_ready

    port = free_port()
    env = axion_env(tiny_model_dir, None, port, MAX_SEQ_LEN="1024", MAX_BATCH_SIZE="4", SERVE_EMBEDDINGS="false",
                    DECODE_GRAPHS="on", GRAPH_MAX_LEN="256", DECODE_AHEAD="true")
    proc = Proc(["serve"], env, tmp_path / "serve.log").start()
    server = Server(f"http://127.0.0.1:{port}", str(tiny_model_dir), [proc])
    lengths = [12 + 9 * i for i in range(len(PROMPTS))]

    async def one(client, prompt: str, n: int) -> str:  # type: ignore[no-untyped-def]
        stream = await client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=n,
            stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_of_them() -> list[str]:
        client = server.async_client(timeout=60)
        return await asyncio.gather(*(one(client, p, n) for p, n in zip(PROMPTS, lengths, strict=True)))

    try:
        wait_ready(server.base_url, [proc])
        texts = asyncio.run(all_of_them())
        health = get_json(f"{server.base_url}/health")
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]
    _, tok = loaded
    assert texts == [tok.decode(greedy_ids(loaded, p, n), skip_special_tokens=True)
                     for p, n in zip(PROMPTS, lengths, strict=True)]
    assert "decode graphs: KV buffers for 4 rows x 256 positions" in proc.log()
    assert "decode ahead: on while every row is plain greedy" in proc.log()
    assert health["workers"][0]["memory"]["kv_cache_bytes"] == 0  # every stream done: no batch held


COPIES = frozenset({"aten.index_copy_.default", "aten.clone.default", "aten.copy_.default", "aten.cat.default"})


class KernelCount(TorchDispatchMode):
    """Counts the ops that copy tensors, outside the model's forward pass (which a GPU replays as one graph)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.copies = 0
        self._in_forward = False
        self._model = model

    def __enter__(self):  # type: ignore[no-untyped-def]
        original = self._model.forward

        def forward(*args, **kwargs):  # type: ignore[no-untyped-def]
            self._in_forward = True
            try:
                return original(*args, **kwargs)
            finally:
                self._in_forward = False

        self._model.forward = forward  # type: ignore[method-assign]
        self._restore = original
        return super().__enter__()

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        self._model.forward = self._restore  # type: ignore[method-assign]
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not self._in_forward and str(func) in COPIES:
            self.copies += 1
        return func(*args, **(kwargs or {}))


def test_a_join_copies_every_layer_at_once(tmp_path: Path) -> None:
    """Joining a held batch (graph prefill, the prefix cache's copy, the write into free slots) moves the keys and
    values of every layer with one kernel each time, not one per layer per tensor: on a GPU each is a launch."""
    from devtools.chat_models import build_tiny_llama

    folder = build_tiny_llama(tmp_path / "deep", num_layers=6)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, decode_graphs="on", max_batch_size=8,
                        prefix_cache_tokens=4096)
    for i, p in enumerate(PROMPTS[:3]):
        admit(engine, job(p, str(i), 20))
    engine.step()
    engine.step()
    assert engine.graphs is not None and engine.graphs.holding
    admit(engine, job(LONG, "joiner", 20))
    count = KernelCount(model)
    with torch.inference_mode(), count:
        engine.prefill_step()
    assert engine.graphs.rows == 4 and engine.prefix_cache.nbytes > 0
    assert count.copies <= 8, count.copies  # 7; one per layer per tensor before: 29 here


def test_a_short_cached_prefix_is_recomputed_in_a_graph_prefill(loaded: tuple) -> None:
    """A prompt whose cached prefix is at most half of it (a chat template's fixed header, say) replays a prefill
    graph with the prefix recomputed, instead of an eager pass that continues it; one that is mostly cached
    continues it eagerly. Either way greedy output equals `generate`'s, and `cached_tokens` says what was kept."""
    model, tok = loaded
    engine = ChatEngine(model, tok, torch.device("cpu"), 4096, decode_graphs="on", max_batch_size=4,
                        prefix_cache_tokens=4096)
    prefill = engine.prefill_graphs
    assert prefill is not None
    words = tok(" ".join(PROMPTS * 3))["input_ids"]
    header, tail = words[:16], words[16:]

    def ask(rid: str, ids: list[int]) -> Sequence:
        seq = admit(engine, ChatJob(request_id=rid, model="m", messages=[], prompt_ids=ids, created=0.0,
                                    params=SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)))
        drain(engine, {})
        with torch.inference_mode():
            reference = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert seq.output_ids == reference[0, len(ids):].tolist(), rid
        return seq

    ask("first", header + tail[:20])
    replays, reused = prefill.replays, engine.prefix_cache.reused_tokens
    short = ask("short", header + tail[30:50])  # 16 of 36 tokens cached
    assert (prefill.replays, short.cached_tokens, engine.prefix_cache.reused_tokens) == (replays + 1, 0, reused)
    longer = ask("longer", header + tail[:40])  # 32 of 56 tokens cached (the first prompt's two full blocks)
    mostly = ask("mostly", header + tail[:40] + tail[60:66])  # 48 of 62 cached
    assert (prefill.replays, longer.cached_tokens, mostly.cached_tokens) == (replays + 1, 32, 48)
