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
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench`, `common` and `workers` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _bound, _client, _engine
from bench._measure import LevelStats, PromptFactory, percentile
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
    from workers.devmodels import build_tiny_llama

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


# ---- report ------------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    """Short HEAD, marked when the tree has uncommitted changes (others may be editing the engine meanwhile)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (+ uncommitted changes)" if dirty else head


def _parameters(model_dir: Path) -> int:
    """Counted from the safetensors headers, so modes that never load the model can still report it."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            total += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    return total


def _device_name(device: str, dtype: str) -> str:
    """"cpu, float32" or "cuda (NVIDIA H100 80GB HBM3), bfloat16": what DEVICE and DTYPE resolve to here."""
    import torch

    from workers.chat.loader import pick_device

    where, resolved = pick_device(device, dtype)
    name = f"cuda ({torch.cuda.get_device_name(where)})" if where.type == "cuda" else where.type
    return f"{name}, {str(resolved).removeprefix('torch.')}"


def header(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": _git_commit(), "platform": platform.platform(), "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
        "model": str(args.model), "parameters": _parameters(args.model), "mode": args.mode,
        "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens, "concurrency": args.levels,
        "rounds": args.rounds, "max_batch_size": args.max_batch_size, "device": _device_name(args.device, args.dtype),
        "rate": args.rate, "duration_s": args.duration, "requests": args.requests,
        "system_tokens": args.system_tokens, "followers": args.followers, "burst": args.burst,
        "max_seq_len": args.max_seq_len,
        "engine_options": _engine.engine_options(), "client": args.client,
    }


def _settings_line(h: dict[str, Any]) -> str:
    if h["mode"] == "poisson":
        rate = f"{h['rate']} req/s" if h["rate"] else f"half the best of levels {h['concurrency']}"
        span = f"{h['requests']} requests" if h["requests"] else f"{h['duration_s']:.0f} s of arrivals"
        return f"Poisson rate {rate}, {span}"
    if h["mode"] == "shared-prefix":
        return (f"system prompt {h['system_tokens']} tokens, first request then {h['followers']} more one by one, "
                f"then bursts of {h.get('burst', 0)} at once")
    return f"levels {h['concurrency']}, {h['rounds']} request(s) per client per level"


CLIENTS = {"raw": "OpenAI-protocol streaming on raw asyncio sockets, SSE parsed with msgspec (bench/_sse.py; "
                  "vLLM's benchmark does the same with aiohttp)",
           "httpx": "OpenAI-protocol streaming over httpx, SSE parsed with msgspec",
           "openai": "the official openai SDK (AsyncOpenAI)"}


def header_markdown(h: dict[str, Any]) -> str:
    return "\n".join([
        f"## Axion serve_bench: {h['mode']}", "",
        f"- date (UTC): {h['date_utc']}; git: {h['git_commit']}",
        f"- machine: {h['cpu_model']}, {h['cpu_count']} CPUs, {h['platform']}; torch {h['torch']}, "
        f"transformers {h['transformers']}; {h['device']}",
        f"- model: {h['model']} ({h['parameters'] / 1e6:.2f} M parameters)",
        f"- prompt ~{h['prompt_tokens']} tokens (chat-templated), output exactly {h['output_tokens']} tokens, "
        f"greedy; {_settings_line(h)}",
        f"- server MAX_BATCH_SIZE={h['max_batch_size']}, MAX_SEQ_LEN={h['max_seq_len']}; engine options (from "
        f"Settings, as the worker passes them): {h['engine_options']}",
        f"- client: {CLIENTS[h['client']]}",
        "",
    ])


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: list[LevelStats]) -> str:
    lines = ["| system | C | requests | prompt tok | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
             "| chunk gap p50 ms | chunk gap p99 ms |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        c = "–" if r.concurrency == 0 else str(r.concurrency)
        name = f"{r.system}, run {r.extra['repeat'] + 1}" if "repeat" in r.extra else r.system
        lines.append(f"| {name} | {c} | {r.requests} | {r.prompt_tokens_mean:.0f} | {r.tokens_per_s:.1f} | "
                     f"{_f(r.ttft_p50_ms)} | {_f(r.ttft_p99_ms)} | {_f(r.itl_p50_ms, 2)} | {_f(r.itl_p99_ms, 2)} | "
                     f"{_f(r.gap_p50_ms, 2)} | {_f(r.gap_p99_ms, 2)} |")
    short = [f"{r.system} C={r.concurrency}: {r.short_requests}" for r in rows if r.short_requests]
    notes = ["", "ITL = per request (t_last - t_first) / (completion tokens - 1), then p50/p99 over requests; "
             "chunk gaps = gaps between successive output pieces, pooled (a piece may hold several tokens)."]
    if short:
        notes.append("WARNING: requests with a completion length other than asked: " + "; ".join(short))
    return "\n".join(lines + notes)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def render_concurrency(rows: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Per level: the median over repeats of each paired ratio (server and engine of the same repeat; server
    and sequential `generate` of the same repeat), with the spread of the paired ratios."""
    def by_repeat(name: str) -> dict[tuple[int, int], LevelStats]:
        return {(r.extra.get("repeat", 0), r.concurrency): r for r in rows[name]}

    engine, seq = by_repeat("engine"), {r.extra.get("repeat", 0): r for r in rows["sequential"]}
    seq_axion = {r.extra.get("repeat", 0): r for r in rows.get("sequential_axion", [])}
    lines = ["", "| C | server tok/s | engine-alone tok/s | server ÷ engine (target ≥ 0.95) | "
             "server ÷ sequential generate | server ÷ sequential generate on Axion's CPU_LINEAR layers | "
             "CPU % worker / api / redis / driver |", "|--:|--:|--:|--:|--:|--:|--:|"]
    derived: dict[str, Any] = {"per_level": []}
    for c in dict.fromkeys(r.concurrency for r in rows["server"]):
        runs = [r for r in rows["server"] if r.concurrency == c]
        pairs = [(r, engine.get((r.extra.get("repeat", 0), c)), seq.get(r.extra.get("repeat", 0))) for r in runs]
        vs_engine = [v for r, e, _ in pairs if (v := _ratio(r.tokens_per_s, e.tokens_per_s if e else None))]
        vs_seq = [v for r, _, q in pairs if (v := _ratio(r.tokens_per_s, q.tokens_per_s if q else None))]
        vs_axion = [v for r in runs if (q := seq_axion.get(r.extra.get("repeat", 0)))
                    and (v := _ratio(r.tokens_per_s, q.tokens_per_s))]
        engines = [e.tokens_per_s for _, e, _ in pairs if e]
        derived["per_level"].append({"concurrency": c, "server_over_engine": percentile(vs_engine, 50),
                                     "server_over_engine_runs": vs_engine,
                                     "server_over_sequential": percentile(vs_seq, 50),
                                     "server_over_sequential_runs": vs_seq,
                                     "server_over_sequential_axion": percentile(vs_axion, 50)})
        cpu = " / ".join(f"{v:.0f}" for v in runs[-1].extra.get("cpu_pct", {}).values())
        lines.append(f"| {c} | {percentile([r.tokens_per_s for r in runs], 50):.1f} | "
                     f"{_f(percentile(engines, 50))} | {_median_spread(vs_engine, 3)} | "
                     f"{_median_spread(vs_seq, 2, '×')} | {_median_spread(vs_axion, 2, '×')} | {cpu} |")
    at16 = next((d["server_over_sequential"] for d in derived["per_level"] if d["concurrency"] == 16), None)
    derived["server16_over_sequential"] = at16
    repeats = len(seq) or 1
    lines += ["", f"Target: server tok/s at C=16 ÷ sequential generate tok/s = {_f(at16, 2)} (target ≥ 7×).",
              "Sequential and static `generate` run on the model's layers as transformers runs them; where the "
              "server switched them (CPU_LINEAR, workers/chat/cpu_linear.py), sequential `generate` runs again on "
              "the switched layers, so the last ratio column is what batching alone gives.",
              f"Each cell is the median of {repeats} paired run(s); brackets give the lowest and highest paired "
              "ratio. Throughputs are medians over the runs.",
              f"CPU % = CPU time of each process over the level's wall time (100 = one core of {os.cpu_count()}); "
              "the driver is this process (the benchmark's client)."]
    if "bound" in rows:
        bound_lines, derived["bound"] = render_bound(rows)
        lines += bound_lines
    return lines, derived


def render_bound(rows: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Server and engine throughput as a share of the memory-bandwidth bound (bench/_bound.py), and TTFT."""
    bandwidth = rows["bandwidth_bytes_per_s"]
    lines = ["", f"Memory-bandwidth bound: measured device-to-device copy {bandwidth / 1e12:.2f} TB/s (read + write); "
             "bytes per step = weights read once + every sequence's cached keys and values (prompt + half the "
             "output).", "", "| C | MB per step | bound step ms | bound tok/s | server tok/s | server ÷ bound | "
             "engine ÷ bound | server TTFT p50 ms |", "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    derived = []
    for b in rows["bound"]:
        c = b["concurrency"]
        server = percentile([r.tokens_per_s for r in rows["server"] if r.concurrency == c], 50)
        engine = percentile([r.tokens_per_s for r in rows["engine"] if r.concurrency == c], 50)
        ttft = percentile([r.ttft_p50_ms for r in rows["server"] if r.concurrency == c and r.ttft_p50_ms], 50)
        entry = {**b, "server_over_bound": _ratio(server, b["tokens_per_s"]),
                 "engine_over_bound": _ratio(engine, b["tokens_per_s"]), "server_ttft_p50_ms": ttft}
        derived.append(entry)
        lines.append(f"| {c} | {b['bytes_per_step'] / 1e6:.0f} | {b['step_ms']:.3f} | {b['tokens_per_s']:.0f} | "
                     f"{_f(server)} | {_f(entry['server_over_bound'], 3)} | {_f(entry['engine_over_bound'], 3)} | "
                     f"{_f(ttft)} |")
    at = {d["concurrency"]: d for d in derived}
    if 64 in at:
        lines.append(f"\nTarget: server ÷ bound at C=64 = {_f(at[64]['server_over_bound'], 3)} (target ≥ 0.25).")
    if 32 in at:
        lines.append(f"Target: server TTFT p50 at C=32 = {_f(at[32]['server_ttft_p50_ms'])} ms (target < 200 ms).")
    return lines, derived


def _median_spread(values: list[float], digits: int, unit: str = "") -> str:
    if not values:
        return "–"
    middle = f"{_f(percentile(values, 50), digits)}{unit}"
    if len(values) == 1:
        return middle
    return f"{middle} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def render(mode: str, rows: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    if mode == "concurrency":
        static = [rows["static"]] if "static" in rows else []
        ordered = rows["sequential"] + rows.get("sequential_axion", []) + static + rows["engine"]
        ordered += ([rows["hf_cb"]] if "hf_cb" in rows else []) + rows["server"]
        lines, derived = render_concurrency(rows)
        return {"markdown": "\n".join(["### Concurrency", "", table(ordered), *lines]), "derived": derived}
    if mode == "poisson":
        return render_poisson(rows)
    return render_shared_prefix(rows)


def render_poisson(rows: dict[str, Any]) -> dict[str, Any]:
    p, lone = rows["poisson"], rows["lone"]
    ratio = _ratio(p.ttft_p50_ms, lone.ttft_p50_ms)
    derived = {"rate_rps": rows["rate_rps"], "offered_rate_rps": p.extra.get("offered_rate_rps"),
               "achieved_rate_rps": p.requests / p.wall_s, "ttft_p50_over_lone": ratio}
    lines = ["### Poisson arrivals", "", table([lone, *rows.get("capacity", []), p]), "",
             f"Poisson rate {rows['rate_rps']:.3f} req/s"
             + (" (half the best capacity above)" if "capacity" in rows else " (--rate)")
             + f"; offered {_f(derived['offered_rate_rps'], 3)} req/s, completed {derived['achieved_rate_rps']:.3f}"
             f" req/s over {p.wall_s:.1f} s.",
             f"TTFT p50 under Poisson ÷ lone-request TTFT p50 = {_f(ratio, 2)}×."]
    return {"markdown": "\n".join(lines), "derived": derived}


def render_shared_prefix(rows: dict[str, Any]) -> dict[str, Any]:
    first, later = rows["first"], rows["later"]
    p50 = _ttft_ms(later)
    ratio = _ratio(p50, first.ttft * 1000 if first.ttft is not None else None)
    cached = [t.cached_tokens for t in [first, *later]]
    cached_text = "not returned by the server" if all(c is None for c in cached) else str(cached)
    burst_new, burst_cached = rows.get("burst_new", []), rows.get("burst_cached", [])
    lines = ["### Shared prefix", "", "| request | n | prompt tok | TTFT p50 ms | TTFT p99 ms |",
             "|---|--:|--:|--:|--:|",
             f"| first (cold prefix) | 1 | {first.prompt_tokens} | {_f(first.ttft * 1000)} | – |",
             *(f"| {name} | {len(group)} | {group[0].prompt_tokens} | {_f(_ttft_ms(group))} | "
               f"{_f(_ttft_ms(group, 99))} |"
               for name, group in [("later, one by one (same system prompt)", later),
                                   ("burst at once, a new system prompt", burst_new),
                                   ("burst at once, the cached system prompt", burst_cached)] if group), "",
             f"later TTFT p50 ÷ first TTFT = {_f(ratio, 3)}; usage.prompt_tokens_details.cached_tokens "
             f"(first, then later): {cached_text}."]
    derived = {"first_ttft_ms": first.ttft * 1000, "later_ttft_p50_ms": p50, "later_over_first": ratio,
               "cached_tokens": cached}
    if burst_new and burst_cached:
        derived |= {"burst_new_ttft_p50_ms": _ttft_ms(burst_new), "burst_cached_ttft_p50_ms": _ttft_ms(burst_cached),
                    "burst_cached_tokens": [t.cached_tokens for t in burst_cached]}
        lines.append(f"Burst TTFT p50, cached ÷ new system prompt = "
                     f"{_f(_ratio(derived['burst_cached_ttft_p50_ms'], derived['burst_new_ttft_p50_ms']), 3)}; "
                     f"cached_tokens in the cached burst: {sorted(set(derived['burst_cached_tokens']))}.")
    return {"markdown": "\n".join(lines), "derived": derived}


def _ttft_ms(timings: list[Any], q: float = 50) -> float | None:
    """The TTFT percentile `q` (the median unless asked) in ms."""
    return percentile([t.ttft * 1000 for t in timings if t.ttft is not None], q)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value) | ({"ttft_s": value.ttft, "itl_s": value.itl}
                                           if not isinstance(value, LevelStats) else {})
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


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
    prompts = PromptFactory(AutoTokenizer.from_pretrained(args.model), args.prompt_tokens)
    info = header(args)
    print(header_markdown(info))
    runner = {"concurrency": run_concurrency, "poisson": run_poisson, "shared-prefix": run_shared_prefix}[args.mode]
    rows = runner(args, prompts)
    summary = render(args.mode, rows, args)
    print(summary["markdown"])
    if args.json:
        args.json.write_text(json.dumps({"header": info, "mode": args.mode, "results": _jsonable(rows),
                                         "derived": summary["derived"]}, indent=2, default=str))
        print(f"raw numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
