"""Engine-alone baselines, in this process and with no server running: what the hardware gives without HTTP/Redis.

* sequential `generate`: the "no batching at all" floor the project's 7× target is measured against;
* one static left-padded `generate` batch: what plain batching gives when every request arrives at once;
* Axion's `ChatEngine` stepped directly, with the same concurrency cap the server runs under: the ceiling the
  server can reach, so server ÷ engine is the cost of the API, Redis and the worker loop;
* optionally transformers' own continuous batching manager, as an outside reference.
"""

from __future__ import annotations

import gc
import inspect
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from bench._measure import LevelStats, PromptFactory, RequestTiming, level_key, summarize, warmup_key
from common.protocol import ChatJob, ChatMessage, Delta, Finished, SamplingParams
from workers.chat.engine import ChatEngine, Sequence


def load(model_dir: Path, device: str = "cpu", attn_implementation: str | None = None) -> tuple[Any, Any]:
    """As the worker loads it (`workers/chat/loader.load_causal_lm`, with the settings of this process's
    environment, which the server inherits: DTYPE, CPU_LINEAR, MAX_BATCH_SIZE; never QUANTIZATION, which
    bench/quant_bench.py measures), on `device` (auto, cpu or cuda), with torch using every core, or as many
    threads as OMP_NUM_THREADS says (the server's worker inherits it too, and torch reads it at start)."""
    from common.settings import load_settings
    from workers.chat.loader import load_causal_lm

    settings = load_settings()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    loaded = load_causal_lm(str(model_dir), device, dtype_name=settings.dtype, cpu_linear=settings.cpu_linear,
                            batch_rows=settings.max_batch_size, attn_implementation=attn_implementation)
    return loaded.model, loaded.tokenizer


class _TokenClock(BaseStreamer):
    """Records when `generate` produces each token (its first `put` is the prompt, which is skipped)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def _greedy(tokenizer: Any, out: int) -> GenerationConfig:
    """min_new_tokens = max_new_tokens, so EOS cannot end a request early (the server side uses ignore_eos)."""
    return GenerationConfig(do_sample=False, max_new_tokens=out, min_new_tokens=out,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


@torch.inference_mode()
def sequential_generate(model: Any, tokenizer: Any, prompts: PromptFactory, out: int, n: int,
                        name: str = "generate, sequential") -> LevelStats:
    """N requests one after another, batch size 1."""
    config = _greedy(tokenizer, out)
    model.generate(torch.tensor([prompts.ids("warmup-generate")], device=model.device), generation_config=config)
    inputs = [torch.tensor([prompts.ids(f"generate-{i}")], device=model.device) for i in range(n)]
    timings: list[RequestTiming] = []
    start = time.perf_counter()
    for ids in inputs:
        clock = _TokenClock()
        sent = time.perf_counter()
        result = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=clock)
        produced = int(result.shape[1] - ids.shape[1])
        timings.append(RequestTiming(sent=sent, first=clock.times[0], last=clock.times[-1], chunks=clock.times,
                                     completion_tokens=produced, prompt_tokens=int(ids.shape[1])))
    return summarize(name, 1, timings, time.perf_counter() - start, out)


@torch.inference_mode()
def static_batch_generate(model: Any, tokenizer: Any, prompts: PromptFactory, out: int, n: int) -> LevelStats:
    """One left-padded `generate` call over N prompts; latencies are not observable per request, only throughput."""
    config = _greedy(tokenizer, out)
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": [prompts.ids(f"generate-{i}") for i in range(n)]},
                          return_tensors="pt").to(model.device)
    warm = tokenizer.pad({"input_ids": [prompts.ids("warmup-generate")] * 2}, return_tensors="pt").to(model.device)
    model.generate(**warm, generation_config=config)
    start = time.perf_counter()
    result = model.generate(**batch, generation_config=config).cpu()
    wall = time.perf_counter() - start
    new = result[:, batch["input_ids"].shape[1]:]
    timings = [RequestTiming(sent=start, completion_tokens=int(row.numel()),
                             prompt_tokens=int(mask.sum())) for row, mask in zip(new, batch["attention_mask"],
                                                                                 strict=True)]
    return summarize("generate, static batch", n, timings, wall, out)


def engine_options() -> dict[str, Any]:
    """The keyword options the worker would pass to ChatEngine, read from Settings like the worker reads them.

    Settings come from this process's environment, which the server inherits, so a PREFIX_CACHE_TOKENS or
    PREFILL_CHUNK_TOKENS set for the run applies to both sides; options ChatEngine does not take are skipped.
    """
    from common.settings import load_settings

    settings = load_settings()
    return {name: getattr(settings, name) for name, param in inspect.signature(ChatEngine).parameters.items()
            if param.kind is inspect.Parameter.KEYWORD_ONLY and hasattr(settings, name)}


def _job(request_id: str, messages: list[dict[str, str]], out: int) -> ChatJob:
    return ChatJob(request_id=request_id, model="m", messages=[ChatMessage(**m) for m in messages],
                   params=SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True), created=0.0)


def _admit(engine: ChatEngine, job: ChatJob) -> tuple[Sequence, RequestTiming]:
    """TTFT starts before `prepare` (templating + tokenizing), as it does on the server."""
    timing = RequestTiming(sent=time.perf_counter())
    seq = engine.prepare(job)
    if not isinstance(seq, Sequence):
        raise RuntimeError(f"ChatEngine.prepare refused request {job.request_id}: {seq}")
    engine.add(seq)
    timing.prompt_tokens = len(seq.prompt_ids)
    return seq, timing


def _drive(engine: ChatEngine, jobs: list[ChatJob], concurrency: int) -> tuple[list[RequestTiming], float]:
    """Keep at most `concurrency` sequences admitted, admitting the next job as soon as one finishes."""
    queue, live, done = deque(jobs), {}, []
    start = time.perf_counter()
    while queue or live:
        while queue and engine.active < concurrency:
            seq, timing = _admit(engine, queue.popleft())
            live[seq.request_id] = timing
        events = engine.step()
        now = time.perf_counter()
        engine.released.clear()  # the worker drains this list to XACK; nothing to acknowledge here
        for seq, event in events:
            if not isinstance(event, Delta | Finished):
                raise RuntimeError(f"ChatEngine.step returned {event!r} for {seq.request_id}")
            timing = live[seq.request_id]
            timing.first = timing.first if timing.first is not None else now
            if not timing.chunks or timing.chunks[-1] != now:
                timing.chunks.append(now)
            if isinstance(event, Finished):
                timing.last, timing.completion_tokens = now, event.completion_tokens
                done.append(live.pop(seq.request_id))
    return done, time.perf_counter() - start


def chat_engine(model: Any, tokenizer: Any, prompts: PromptFactory, out: int, concurrency: int,
                requests: int, max_seq_len: int, prefix: str = "") -> LevelStats:
    """The Axion engine without API or Redis, at the server's concurrency and request count; `prefix` as in
    `bench._client.run_level`."""
    engine = ChatEngine(model, tokenizer, model.device, max_seq_len, **engine_options())
    engine.capture_graphs()  # as the worker does at its warm-up: no capture inside the timed run
    warmup = [_job(f"warmup{i}", prompts.messages(prefix + warmup_key(concurrency, i)), out)
              for i in range(concurrency)]
    _drive(engine, warmup, concurrency)  # one round as wide as the level, as the server's runs warm up
    jobs = [_job(f"r{i}", prompts.messages(prefix + level_key(concurrency, i)), out) for i in range(requests)]
    timings, wall = _drive(engine, jobs, concurrency)
    return summarize("ChatEngine alone", concurrency, timings, wall, out)


def _cb_config(prompt_len: int, out: int, concurrency: int) -> Any:
    """KV pages for exactly `concurrency` requests (+1 spare each): the default sizing is for GPUs and takes GBs."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 64
    pages_per_request = -(-(prompt_len + out) // page) + 1
    return ContinuousBatchingConfig(
        page_size=page, num_blocks=concurrency * pages_per_request, max_batch_tokens=max(256, concurrency * prompt_len),
        max_requests_per_batch=concurrency, allow_block_sharing=False, use_cuda_graph=False,
        use_async_batching=False, auto_switch_to_flash=False)


def _cb_collect(manager: Any, sent: dict[str, float]) -> list[RequestTiming]:
    """Wait for every request; per-token timestamps (perf_counter) come from `record_timestamps=True`."""
    timings: list[RequestTiming] = []
    while len(timings) < len(sent):
        result = manager.get_result(timeout=60)
        if result is None:
            raise RuntimeError(f"transformers continuous batching stalled after {len(timings)}/{len(sent)} requests")
        if not result.is_finished():
            continue
        if result.error:
            raise RuntimeError(f"transformers continuous batching failed {result.request_id}: {result.error}")
        stamps = list(result.timestamps or [])
        timings.append(RequestTiming(sent=sent[result.request_id], first=stamps[0] if stamps else None,
                                     last=stamps[-1] if stamps else None, chunks=stamps,
                                     completion_tokens=len(result.generated_tokens),
                                     prompt_tokens=len(result.prompt_ids)))
    return timings


@torch.no_grad()
def hf_continuous_batching(model_dir: Path, prompts: PromptFactory, out: int, concurrency: int,
                           device: str = "cpu") -> LevelStats:
    """transformers' ContinuousBatchingManager (sdpa, paged KV), `concurrency` requests submitted at once.

    eos_token_id=-1 turns EOS off, like ignore_eos on the server.
    """
    model, tokenizer = load(model_dir, device, attn_implementation="sdpa")
    keys = ["warmup-cb", *(level_key(concurrency, i) for i in range(concurrency))]
    longest = max(len(prompts.ids(k)) for k in keys)
    config = GenerationConfig(do_sample=False, max_new_tokens=out, eos_token_id=-1,
                              pad_token_id=tokenizer.pad_token_id)
    manager = model.init_continuous_batching(
        generation_config=config, continuous_batching_config=_cb_config(longest, out, concurrency))
    manager.start()
    try:
        manager.add_request(prompts.ids(keys[0]), request_id="warmup", max_new_tokens=out, eos_token_id=-1)
        _cb_collect(manager, {"warmup": time.perf_counter()})
        sent: dict[str, float] = {}
        start = time.perf_counter()
        for i in range(concurrency):
            sent[f"r{i}"] = time.perf_counter()
            manager.add_request(prompts.ids(keys[i + 1]), request_id=f"r{i}", max_new_tokens=out, eos_token_id=-1,
                                record_timestamps=True)
        timings = _cb_collect(manager, sent)
        wall = time.perf_counter() - start
    finally:
        manager.stop(block=True, timeout=30)
        del manager, model
        gc.collect()
    return summarize("transformers CB (sdpa)", concurrency, timings, wall, out)
