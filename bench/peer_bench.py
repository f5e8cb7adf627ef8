"""Axion beside its peers on one machine: the same streaming load against each server, started one after another
and alternated, so a ratio compares runs minutes apart on the same model, dtype and batch size.

    python bench/peer_bench.py models/bench-medium                    # axion-native, axion-vllm, vllm, transformers
    python bench/peer_bench.py --write-model qwen-0.5b /tmp/qwen05    # the Qwen2.5-0.5B shape, random weights
    python bench/peer_bench.py /tmp/qwen05 --concurrency 1,16 --rounds 1 --systems axion-native,vllm
    python bench/peer_bench.py --embeddings                           # Axion against infinity-emb (its own venv)

One neutral client for every server (bench/_sse.py: raw sockets, SSE parsed with msgspec): TTFT is send to the first
chunk with non-empty content, ITL the time between content chunks, TPOT first to last content over the tokens after
the first; token counts come from the usage chunk, and a request that did not produce exactly --output-tokens is
reported short. Every request is greedy with `ignore_eos`, on distinct prompts of --prompt-tokens tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench`, `common` and `workers` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _client, _embed_peers
from bench._measure import LevelStats, PromptFactory
from bench._peers import SYSTEMS, PeerServer
from bench._report import cpu_model, git_commit, parameters
from common import aio

QWEN_05B = {"hidden_size": 896, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2, "intermediate_size": 4864,
            "vocab_size": 151936, "tie_word_embeddings": True}
MEDIUM = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 1376,
          "vocab_size": 32000}
LLAMA_1B = {"hidden_size": 2048, "num_layers": 16, "num_heads": 32, "num_kv_heads": 8, "intermediate_size": 8192,
            "vocab_size": 128256, "tie_word_embeddings": True, "dtype": "bfloat16"}
SIZES = {"qwen-0.5b": QWEN_05B, "medium": MEDIUM, "llama-1b": LLAMA_1B}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, help="model folder")
    p.add_argument("--write-model", nargs=2, metavar=("SIZE", "DIR"), help=f"SIZE: {', '.join(SIZES)}; then exit")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--rounds", type=int, default=2, help="requests each client sends back to back per level")
    p.add_argument("--alternations", type=int, default=2, help="times the whole list of systems runs")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=64, help="every server's batch size (vLLM: max_num_seqs)")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--dtype", default="auto", help="every server's dtype (auto: Axion's choice for this machine)")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-gib", type=int, default=2, help="vLLM's CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile (both vLLM systems)")
    p.add_argument("--embeddings", action="store_true", help="the embedding comparison instead (see _embed_peers)")
    p.add_argument("--clients", type=int, default=32, help="embeddings: concurrent one-sentence clients")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = p.parse_args(argv)
    if args.write_model is None and args.model is None and not args.embeddings:
        p.error("a model folder is required (or --write-model SIZE DIR, or --embeddings)")
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.system_list if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown systems: {unknown}")
    return args


def resolved_dtype(args: argparse.Namespace) -> str:
    from workers.chat.loader import pick_device

    return str(pick_device(args.device, args.dtype)[1]).removeprefix("torch.")


def run_chat(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    prompts = PromptFactory(AutoTokenizer.from_pretrained(args.model), args.prompt_tokens)
    rows: list[dict[str, Any]] = []
    for alternation in range(args.alternations):
        for system in args.system_list:
            server = PeerServer(system, args.model, dtype=args.dtype, max_batch_size=args.max_batch_size,
                                max_seq_len=args.max_seq_len, kv_cache_gib=args.kv_cache_gib,
                                enforce_eager=args.enforce_eager)
            try:
                with server:
                    print(f"- {system} (alternation {alternation}) ready in {server.ready_s:.0f}s", flush=True)
                    for level in args.levels:
                        stats = aio.run(_level(server, prompts, level, args, prefix=f"a{alternation}-{system}-"))
                        print(f"  C={level}: {stats.tokens_per_s:.1f} tok/s, TTFT p50 {stats.ttft_p50_ms:.0f} ms, "
                              f"short {stats.short_requests}", flush=True)
                        rows.append({"system": system, "alternation": alternation, "stats": stats})
            except Exception as exc:  # one system failing must not lose the others' figures
                print(f"- {system} (alternation {alternation}) failed: {type(exc).__name__}: {exc}", flush=True)
    return {"rows": rows}


async def _level(server: PeerServer, prompts: PromptFactory, level: int, args: argparse.Namespace,
                 prefix: str) -> LevelStats:
    async with _client.RawClient(server.base_url) as client:
        return await _client.run_level(server, client, prompts, level, args.rounds,  # type: ignore[arg-type]
                                       args.output_tokens, system=server.system, prefix=prefix,
                                       ignore_eos=server.takes_ignore_eos)


def summary(rows: list[dict[str, Any]], levels: list[int], systems: list[str]) -> str:
    """Per level and system: medians over the alternations; ratios to bare vLLM's medians. ITL is the gap between
    content chunks; TPOT a request's first to last content chunk over its tokens after the first."""
    def median(system: str, level: int, field: str) -> float | None:
        values = [getattr(r["stats"], field) for r in rows if r["system"] == system
                  and r["stats"].concurrency == level and getattr(r["stats"], field) is not None]
        return statistics.median(values) if values else None

    lines = ["| C | system | output tok/s | ÷ vLLM | TTFT p50 ms | ÷ vLLM | TTFT p99 ms | ITL p50 ms | TPOT p50 ms |"
             " short |", "|---|---|---|---|---|---|---|---|---|---|"]
    for level in levels:
        base_tps, base_ttft = median("vllm", level, "tokens_per_s"), median("vllm", level, "ttft_p50_ms")
        for system in systems:
            tps, ttft = median(system, level, "tokens_per_s"), median(system, level, "ttft_p50_ms")
            if tps is None:
                continue
            short = sum(r["stats"].short_requests for r in rows if r["system"] == system
                        and r["stats"].concurrency == level)
            each = " / ".join(f"{r['stats'].tokens_per_s:.0f}" for r in rows if r["system"] == system
                              and r["stats"].concurrency == level)
            lines.append(f"| {level} | {system} | {tps:.1f} ({each}) | {_ratio(tps, base_tps)} | {ttft:.0f} | "
                         f"{_ratio(ttft, base_ttft)} | {median(system, level, 'ttft_p99_ms'):.0f} | "
                         f"{median(system, level, 'gap_p50_ms'):.1f} | {median(system, level, 'itl_p50_ms'):.1f} | "
                         f"{short} |")
    return "\n".join(lines)


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.3f}" if value is not None and base else "-"


def header(args: argparse.Namespace) -> str:
    load = os.getloadavg()
    model = f"{args.model} ({parameters(args.model) / 1e6:.1f} M parameters)" if args.model else "-"
    return "\n".join([
        "## Axion peer_bench", "",
        f"- date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}; git: {git_commit()}; "
        f"load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        f"- machine: {cpu_model()}, {os.cpu_count()} CPUs; model {model}; dtype {resolved_dtype(args)}",
        f"- prompts ~{args.prompt_tokens} tokens, output exactly {args.output_tokens}, greedy, ignore_eos; "
        f"levels {args.levels}, {args.rounds} request(s) per client per level; batch size {args.max_batch_size}; "
        f"systems {args.system_list}, alternated {args.alternations} times"
        + ("; vLLM enforce_eager" if args.enforce_eager else ""),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_model:
        from devtools.chat_models import build_tiny_llama

        size, out_dir = args.write_model
        print(build_tiny_llama(out_dir, **SIZES[size]))
        return 0
    if args.embeddings:
        result = _embed_peers.run(args)
        print(result["markdown"])
        if args.json:
            args.json.write_text(json.dumps(result["raw"], indent=2, default=str))
        return 0
    args.model = args.model.resolve()
    os.environ["DTYPE"] = args.dtype
    print(header(args), flush=True)
    result = run_chat(args)
    print(summary(result["rows"], args.levels, args.system_list))
    if args.json:
        args.json.write_text(json.dumps([{"system": r["system"], "alternation": r["alternation"],
                                          "stats": r["stats"].__dict__} for r in result["rows"]], indent=2,
                                        default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
