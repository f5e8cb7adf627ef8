"""The memory-bandwidth bound of decoding on a GPU, to set measured throughput against.

A decoding step of C sequences reads every weight once (the input embedding only row by row, unless it is tied to
`lm_head`, which reads it whole) and every cached key and value of the C sequences once. At batch sizes where the
step is bound by memory, not arithmetic (a 1B model in bf16 up to a few hundred sequences on an H100), no engine
decodes faster than bytes ÷ bandwidth per step, so C tokens per that time is the ceiling. The bandwidth is
measured, not taken from a datasheet: a large device-to-device copy, counting bytes read and written.
"""

from __future__ import annotations

from typing import Any

import torch


def measure_bandwidth(device: torch.device, size_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy (read + write), median of `repeats` timed copies."""
    src = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * size_bytes / sorted(times)[len(times) // 2]


def weight_bytes(model: Any) -> int:
    """Bytes of weights one decoding step reads (shared tensors counted once; an untied input embedding skipped)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if embed is not model.get_output_embeddings().weight:
        total -= embed.numel() * embed.element_size()
    return total


def kv_bytes_per_token(model: Any) -> int:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element


def bound(model: Any, bandwidth: float, concurrency: int, prompt_tokens: float, output_tokens: int) -> dict[str, float]:
    """Bytes per step and the tokens/s ceiling at `concurrency`, for a cache that holds on average the prompt
    and half the output (a request's decoding steps see prompt + 0 .. prompt + output - 1 cached tokens)."""
    context = prompt_tokens + (output_tokens - 1) / 2
    step = weight_bytes(model) + concurrency * context * kv_bytes_per_token(model)
    return {"bytes_per_step": step, "step_ms": step / bandwidth * 1000, "tokens_per_s": concurrency * bandwidth / step}
