"""Per-row logits processing and sampling over one batched logits tensor: each sequence keeps its own
parameters and RNG, so one request's settings never reach another row."""

from __future__ import annotations

import torch

from common.protocol import SamplingParams

MIN_TEMPERATURE = 1e-5  # below it sampling is argmax in all but name, and tiny values overflow the division


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % 2**64)
    return generator


def token_seed(seed: int | None, position: int) -> int | None:
    """The seed of a seeded choice's draw for its token at `position`, a function of the two alone (splitmix64
    of them), so a worker that takes a job over after a crash samples the remaining tokens exactly as the first
    worker would have: a generator's state after the replayed tokens could not be rebuilt without redoing every
    draw. Unseeded choices keep their one random stream (None)."""
    if seed is None:
        return None
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) % 2**64
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB % 2**64
    return x ^ (x >> 31)


def banned_ids(params: SamplingParams, produced: int, eos_ids: list[int]) -> list[int]:
    """The ids a row may not pick as its token number `produced`: end of turn under ignore_eos, and end of turn
    and its stop_token_ids while it is shorter than min_tokens."""
    too_short = produced < params.min_tokens
    return (eos_ids if params.ignore_eos or too_short else []) + (params.stop_token_ids if too_short else [])


def needs_processing(params: SamplingParams) -> bool:
    return bool(params.logit_bias or params.presence_penalty or params.frequency_penalty
                or params.repetition_penalty != 1.0)


def process_row(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> None:
    """Apply logit_bias, then the repetition penalty (over prompt and output, as transformers does), then the
    presence and frequency penalties (over the output only, as OpenAI defines them); in place on [vocab]."""
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), device=logits.device, dtype=logits.dtype)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=logits.device, dtype=torch.long)
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
               seed: int | None = None) -> int:
    """One token from a [vocab] row of float32 logits (already masked and processed); `seed` (`token_seed`)
    reseeds the generator for this draw."""
    if params.temperature < MIN_TEMPERATURE:  # 0 is greedy; a denormal one would overflow the logits to inf
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the mass before it already reaches top_p; the top token always stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop[0] = False  # top_p == 0 would otherwise drop it too
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    if seed is not None:
        generator.manual_seed(seed)
    if not bool(torch.isfinite(probs).all()):  # every token masked (say, by stop_token_ids under min_tokens)
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))
