"""Axion serving benchmark: the server under load next to what the same model gives without it.

    python bench/serve_bench.py --write-model tiny models/bench-tiny     # or medium, or llama-1b (GPU)
    python bench/serve_bench.py models/bench-tiny --hf-cb --json out.json  # --mode concurrency (default)
    python bench/serve_bench.py models/bench-tiny --mode poisson         # rate = half the measured capacity
    python bench/serve_bench.py models/bench-tiny --mode shared-prefix

Concurrency mode measures the engine-alone baselines first (sequential `generate`, one static `generate` batch,
the `ChatEngine` stepped in this process at each concurrency, optionally transformers' continuous batching), and
only then starts the server, so the two never compete for the cores. Every request asks for exactly
--output-tokens tokens (`ignore_eos` / `min_new_tokens`), greedy, on prompts of --prompt-tokens tokens.
The `generate` baselines run on the model's linear layers as transformers runs them; where the server switches
them (CPU_LINEAR, workers/chat/cpu_linear.py), sequential `generate` also runs on the switched layers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench`, `common` and `workers` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _bound, _client, _engine
from bench._measure import LevelStats, PromptFactory
from bench._report import header, header_markdown, jsonable, render
from common import aio
from workers.chat.cpu_linear import plain_linear

SEQUENTIAL_AXION = "generate, sequential, Axion's CPU_LINEAR layers"

MEDIUM = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 1376,
          "vocab_size": 32000}
# Shaped like Llama-3.2-1B (1.24 B parameters, tied embeddings, bf16 weights): the GPU benchmark model.
LLAMA_1B = {"hidden_size": 2048, "num_layers": 16, "num_heads": 32, "num_kv_heads": 8, "intermediate_size": 8192,
            "vocab_size": 128256, "tie_word_embeddings": True, "dtype": "bfloat16"}
SIZES: dict[str, dict[str, Any]] = {"tiny": {}, "medium": MEDIUM, "llama-1b": LLAMA_1B}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, help="model folder (build one with --write-model)")
    p.add_argument("--write-model", nargs=2, metavar=("SIZE", "DIR"),
                   help="SIZE is tiny, medium or llama-1b; then exit")
    p.add_argument("--mode", choices=["concurrency", "poisson", "shared-prefix"], default="concurrency")
    p.add_argument("--prompt-tokens", type=int, default=64, help="chat-templated prompt length")
    p.add_argument("--output-tokens", type=int, default=64, help="tokens every request produces")
    p.add_argument("--header-tokens", type=int, default=0,
                   help="a system message of this many tokens before every prompt, the same for all, as a chat "
                        "template's fixed header: the prefix cache finds it in every prompt but the first")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels")
    p.add_argument("--rounds", type=int, default=2, help="requests each client sends back to back per level")
    p.add_argument("--repeats", type=int, default=1,
                   help="concurrency: paired engine/server runs per level; ratios are the median over repeats")
    p.add_argument("--max-batch-size", type=int, default=64, help="MAX_BATCH_SIZE of the server")
    p.add_argument("--max-seq-len", type=int, default=4096, help="MAX_SEQ_LEN of the server and the ChatEngine")
    p.add_argument("--baseline-requests", type=int, default=16, help="requests of the `generate` baselines")
    p.add_argument("--no-engine", action="store_true", help="concurrency mode: skip the engine-alone runs")
    p.add_argument("--hf-cb", action="store_true", help="also run transformers' continuous batching at C=16")
    p.add_argument("--client", choices=["raw", "httpx", "openai"], default="raw",
                   help="raw: asyncio sockets + msgspec SSE parsing, as vLLM's benchmark with aiohttp (default); "
                        "httpx: the same over httpx; openai: the official SDK")
    p.add_argument("--rate", type=float, help="poisson: requests/s (default: half the measured capacity)")
    p.add_argument("--duration", type=float, default=20.0, help="poisson: seconds of arrivals")
    p.add_argument("--requests", type=int, help="poisson: number of requests (overrides --duration)")
    p.add_argument("--system-tokens", type=int, default=512, help="shared-prefix: system prompt tokens")
    p.add_argument("--followers", type=int, default=8, help="shared-prefix: requests after the first")
    p.add_argument("--burst", type=int, default=16,
                   help="shared-prefix: then this many at once with a new system prompt, and with the shared one")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="DTYPE of the server and of every engine-alone run (auto: bf16 on a CPU with AMX, else fp32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="DEVICE of the server and of every engine-alone run (auto: CUDA when torch sees one)")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = p.parse_args(argv)
    if args.write_model is None and args.model is None:
        p.error("a model folder is required (or --write-model SIZE DIR)")
    if args.write_model and args.write_model[0] not in SIZES:
        p.error(f"--write-model SIZE must be one of {', '.join(SIZES)}")
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return args


def write_model(size: str, out_dir: str) -> None:
    from devtools.chat_models import build_tiny_llama

    path = build_tiny_llama(out_dir, **SIZES[size])
    print(f"wrote the {size} benchmark model to {path}")


def run_concurrency(args: argparse.Namespace, prompts: PromptFactory) -> dict[str, Any]:
    """Paired runs: each repeat measures sequential `generate`, then at each level the engine alone and right
    after it the server, so a ratio compares two runs a few seconds apart. The server stays up (idle, blocked on
    its stream read) while the engine runs in this process; the two never run at the same time."""
    out = args.output_tokens
    rows: dict[str, Any] = {"engine": [], "server": [], "sequential": [], "sequential_axion": []}
    model = tokenizer = None
    if not args.no_engine:
        if args.hf_cb:
            rows["hf_cb"] = _engine.hf_continuous_batching(args.model, prompts, out, 16, args.device)
            gc.collect()
        model, tokenizer = _engine.load(args.model, args.device)
        with plain_linear(model):
            rows["static"] = _engine.static_batch_generate(model, tokenizer, prompts, out, args.baseline_requests)
        if model.device.type == "cuda":
            rows["bandwidth_bytes_per_s"] = _bound.measure_bandwidth(model.device)

    async def drive(server: _client.Server) -> None:
        async with server.client(args.client) as client:
            for repeat in range(args.repeats):
                if model is not None:
                    with plain_linear(model) as switched:  # the reference: generate as transformers runs it
                        rows["sequential"].append(_tagged(_engine.sequential_generate(
                            model, tokenizer, prompts, out, args.baseline_requests), repeat))
                    if switched:  # and on the server's CPU_LINEAR layers: what batching alone gives
                        rows["sequential_axion"].append(_tagged(_engine.sequential_generate(
                            model, tokenizer, prompts, out, args.baseline_requests, SEQUENTIAL_AXION), repeat))
                prefix = f"repeat{repeat}-" if repeat else ""  # new prompts: no prefix-cache hits from a repeat
                for c in args.levels:
                    if model is not None:
                        gc.collect()  # this process's garbage is not collected inside either timed run
                        rows["engine"].append(_tagged(_engine.chat_engine(
                            model, tokenizer, prompts, out, c, c * args.rounds, args.max_seq_len, prefix), repeat))
                    gc.collect()
                    rows["server"].append(_tagged(await _client.run_level(
                        server, client, prompts, c, args.rounds, out, prefix=prefix), repeat))

    with _server(args) as server:
        if model is not None and server.dtype != str(model.dtype).removeprefix("torch."):
            raise RuntimeError(f"the server runs {server.dtype}, the engine-alone runs {model.dtype}")
        aio.run(drive(server))
    if "bandwidth_bytes_per_s" in rows:
        rows["bound"] = [{"concurrency": c, **_bound.bound(model, rows["bandwidth_bytes_per_s"], c,
                                                           _prompt_mean(rows, c), out)} for c in args.levels]
    return rows


def _prompt_mean(rows: dict[str, Any], concurrency: int) -> float:
    means = [r.prompt_tokens_mean for r in rows["server"] if r.concurrency == concurrency]
    return sum(means) / len(means)


def _tagged(stats: LevelStats, repeat: int) -> LevelStats:
    stats.extra["repeat"] = repeat
    return stats


def run_poisson(args: argparse.Namespace, prompts: PromptFactory) -> dict[str, Any]:
    """A lone request's TTFT, the capacity (when --rate is not given), then the Poisson load itself."""
    out, rows = args.output_tokens, {}

    async def drive(server: _client.Server) -> None:
        async with server.client(args.client) as client:
            rows["lone"] = await _client.run_level(server, client, prompts, 1, 4, out, "server, lone request",
                                                   prefix="lone-")
            rate = args.rate
            if rate is None:
                rows["capacity"] = [await _client.run_level(server, client, prompts, c, 1, out, "server, capacity")
                                    for c in args.levels]
                rate = max(r.tokens_per_s for r in rows["capacity"]) / out / 2
            rows["rate_rps"] = rate
            arrivals = _client.poisson_arrivals(rate, args.requests, args.duration)
            rows["poisson"] = await _client.run_poisson(server, client, prompts, arrivals, out)

    with _server(args) as server:
        aio.run(drive(server))
    return rows


def run_shared_prefix(args: argparse.Namespace, prompts: PromptFactory) -> dict[str, Any]:
    async def drive(server: _client.Server) -> dict[str, Any]:
        async with server.client(args.client) as client:
            return await _client.run_shared_prefix(server, client, prompts, args.system_tokens, args.followers,
                                                   args.output_tokens, args.burst)

    with _server(args) as server:
        return aio.run(drive(server))


def _server(args: argparse.Namespace) -> _client.Server:
    return _client.Server(args.model, args.max_batch_size, args.max_seq_len, device=args.device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_model:
        write_model(*args.write_model)
        return 0
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    args.model = args.model.resolve()
    os.environ["DTYPE"] = args.dtype  # the server inherits it; bench/_engine.py reads it for the runs in process
    os.environ["MAX_BATCH_SIZE"] = str(args.max_batch_size)  # the engine-alone runs size their graph buffers by it
    prompts = PromptFactory(AutoTokenizer.from_pretrained(args.model), args.prompt_tokens, args.header_tokens)
    info = header(args)
    print(header_markdown(info))
    runner = {"concurrency": run_concurrency, "poisson": run_poisson, "shared-prefix": run_shared_prefix}[args.mode]
    rows = runner(args, prompts)
    summary = render(args.mode, rows, args)
    print(summary["markdown"])
    if args.json:
        args.json.write_text(json.dumps({"header": info, "mode": args.mode, "results": jsonable(rows),
                                         "derived": summary["derived"]}, indent=2, default=str))
        print(f"raw numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
