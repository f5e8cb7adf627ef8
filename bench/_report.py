"""serve_bench's report: the run's header (machine, model, commit, settings) and the markdown tables of each mode.

Kept apart from the runs themselves so serve_bench.py holds only what drives the server and the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench import _engine
from bench._measure import LevelStats, percentile


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
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


def parameters(model_dir: Path) -> int:
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
        "git_commit": git_commit(), "platform": platform.platform(), "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "model": str(args.model), "parameters": parameters(args.model), "mode": args.mode,
        "prompt_tokens": args.prompt_tokens, "header_tokens": args.header_tokens, "output_tokens": args.output_tokens,
        "concurrency": args.levels,
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
        f"transformers {h['transformers']}; {h['device']}"
        + (f"; torch threads OMP_NUM_THREADS={h['omp_num_threads']}" if h.get("omp_num_threads") else ""),
        f"- model: {h['model']} ({h['parameters'] / 1e6:.2f} M parameters)",
        f"- prompt ~{h['prompt_tokens']} tokens (chat-templated)"
        + (f" after a shared {h['header_tokens']}-token system message" if h.get("header_tokens") else "")
        + f", output exactly {h['output_tokens']} tokens, "
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


def jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value) | ({"ttft_s": value.ttft, "itl_s": value.itl}
                                           if not isinstance(value, LevelStats) else {})
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value
