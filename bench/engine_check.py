"""Does the engine on this device give what `generate` gives? A check to run before timing anything on a new device.

    python bench/engine_check.py MODEL_DIR [--device cuda] [--requests 12] [--tokens 48]

Greedy `generate`, one request at a time, is the reference. The ChatEngine then runs the same requests three
ways: alone, all arriving at once, and arriving one per decoding step (so each joins a batch mid-flight). It
prints how many requests match the reference token for token, and where the first difference is for the others
(in bf16 a batched matrix product may round differently from a lone one, which can flip a near-tie argmax).
Exit status 1 when fewer than --min-match of the requests match in any pattern.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import _engine
from bench._measure import PromptFactory
from workers.chat.engine import ChatEngine, Sequence


def reference(model: Any, tokenizer: Any, seqs: list[Sequence], tokens: int) -> list[list[int]]:
    config = _engine._greedy(tokenizer, tokens)
    out = []
    for seq in seqs:
        ids = torch.tensor([seq.prompt_ids], device=model.device)
        result = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        out.append(result[0, ids.shape[1]:].tolist())
    return out


def run_engine(engine: ChatEngine, jobs: list[Any], per_step: int) -> dict[str, list[int]]:
    """Admit `per_step` jobs before each step (0: all at once); the tokens each request got."""
    queue, outputs = list(jobs), {}
    while queue or engine.active:
        take = len(queue) if per_step == 0 else per_step
        for job in queue[:take]:
            seq = engine.prepare(job)
            assert isinstance(seq, Sequence), seq
            engine.add(seq)
        queue = queue[take:]
        engine.step()
        for seq in engine.released:
            outputs[seq.request_id] = list(seq.output_ids)
        engine.released.clear()
    return outputs


def launch_us(device: torch.device, n: int = 2000) -> float:
    x = torch.zeros(16, device=device)
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / n * 1e6


def profile(engine: ChatEngine, lengths: list[PromptFactory], n: int, tokens: int) -> None:
    import cProfile
    import pstats

    jobs = [_engine._job(f"p{i}", lengths[i % 3].messages(f"profile-{i}"), tokens) for i in range(n)]
    run_engine(engine, jobs[:2], 0)  # warm: graphs for these shapes, allocator
    profiler = cProfile.Profile()
    steps = engine.decode_steps
    start = time.perf_counter()
    profiler.enable()
    run_engine(engine, jobs, 0)
    profiler.disable()
    wall = time.perf_counter() - start
    print(f"  profile: {n} requests at once, {engine.decode_steps - steps} decoding steps in {wall:.2f} s")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None if len(a) == len(b) else 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--device", default="auto")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="then profile the host side (cProfile) of N requests arriving at once; print the top functions")
    p.add_argument("--min-match", type=float, default=0.75, help="share of requests that must match exactly")
    args = p.parse_args(argv)
    model, tokenizer = _engine.load(args.model, args.device)
    lengths = [PromptFactory(tokenizer, n) for n in (24, 48, 80)]  # rows of unequal length: left padding
    jobs = [_engine._job(f"r{i}", lengths[i % 3].messages(f"check-{i}"), args.tokens) for i in range(args.requests)]
    engine = ChatEngine(model, tokenizer, model.device, 4096, **_engine.engine_options())
    seqs = [engine.prepare(job) for job in jobs]
    with torch.inference_mode():
        expected = reference(model, tokenizer, [s for s in seqs if isinstance(s, Sequence)], args.tokens)
    print(f"{args.model} on {model.device} ({model.dtype}); {args.requests} requests of {args.tokens} tokens; "
          f"engine options {_engine.engine_options()}")
    if model.device.type == "cuda":
        print(f"  CUDA launch overhead: {launch_us(model.device):.1f} us per small kernel (eager, from Python)")
    start = time.perf_counter()
    built = engine.capture_graphs()  # as the worker's warm-up does: no capture inside the timed patterns
    print(f"  graphs built at warm-up: {built} in {time.perf_counter() - start:.1f} s")
    worst = 1.0
    for name, per_step in (("one at a time", -1), ("all at once", 0), ("one joins per step", 1)):
        start, steps = time.perf_counter(), engine.decode_steps
        if per_step == -1:
            got = {}
            for job in jobs:
                got.update(run_engine(engine, [job], 0))
        else:
            got = run_engine(engine, jobs, per_step)
        wall = time.perf_counter() - start
        diffs = {job.request_id: first_difference(got[job.request_id], want)
                 for job, want in zip(jobs, expected, strict=True)}
        same = sum(d is None for d in diffs.values())
        worst = min(worst, same / len(jobs))
        others = ", ".join(f"{k}@{d}" for k, d in diffs.items() if d is not None)
        steps = engine.decode_steps - steps
        print(f"  {name}: {same}/{len(jobs)} identical to generate ({wall:.2f} s, {steps} steps, "
              f"{wall / max(steps, 1) * 1000:.2f} ms per step)"
              + (f"; first difference at token: {others}" if others else ""))
    if args.profile:
        profile(engine, lengths, args.profile, args.tokens)
    if engine.graphs is not None:
        print(f"  decode graphs: {engine.graphs.replays} steps through the static path, "
              f"{engine.graphs.captures} graphs captured, of {engine.decode_steps} decoding steps")
    if engine.decode_ahead:
        print(f"  decode ahead: {engine.steps_ahead} steps launched before the one before them was read back")
    if engine.prefill_graphs is not None:
        print(f"  prefill graphs: {engine.prefill_graphs.replays} prefill passes replayed, "
              f"{engine.prefill_graphs.captures} graphs captured")
    return 0 if worst >= args.min_match else 1


if __name__ == "__main__":
    sys.exit(main())
