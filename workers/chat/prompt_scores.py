"""Prompt log probabilities (`prompt_logprobs`, legacy `echo` with `logprobs`): how likely each prompt token was
given the ones before it, as scorers such as lm-evaluation-harness read them.

The native engine computes them in a pass of their own over the whole prompt, in chunks on a private KV cache, so
the prefix cache and the batch are untouched and no [prompt, vocabulary] matrix larger than one chunk is held;
vLLM's engine computes them during its prefill (`from_engine`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from common.protocol import PromptLogprobs, PromptTokenLogprob, RankedToken
from workers.chat.logprobs import TokenBytes

#: Logit values one chunk may hold (positions x vocabulary): 256 MiB of float32.
CHUNK_VALUES = 1 << 26


def first_entry(token_id: int, names: TokenBytes) -> PromptTokenLogprob:
    """The prompt's first token: shown, never scored."""
    return PromptTokenLogprob(token_id=token_id, token=names(token_id)[0])


def scored_entry(token_id: int, logprob: float, rank: int, top: list[tuple[int, float]],
                 names: TokenBytes) -> PromptTokenLogprob:
    return PromptTokenLogprob(token_id=token_id, token=names(token_id)[0], logprob=logprob, rank=rank,
                              top=[RankedToken(token_id=t, token=names(t)[0], logprob=v) for t, v in top])


@torch.inference_mode()
def score_prompt(model: Any, ids: list[int], top: int, names: TokenBytes, device: torch.device,
                 vocab: int) -> PromptLogprobs:
    """Every prompt token after the first scored by the model's logits (their first `vocab` columns) at the
    position before it."""
    entries = [first_entry(ids[0], names)]
    chunk = max(1, CHUNK_VALUES // vocab)
    cache = DynamicCache()
    inputs = ids[:-1]  # the last token's logits would score what comes after the prompt
    for start in range(0, len(inputs), chunk):
        piece = torch.tensor([inputs[start:start + chunk]], device=device)
        logits = model(input_ids=piece, past_key_values=cache, use_cache=True).logits[0, :, :vocab]
        log_probs = logits.float().log_softmax(-1)
        targets = torch.tensor(ids[start + 1:start + 1 + piece.shape[1]], device=device)
        chosen = log_probs.gather(1, targets[:, None])[:, 0]
        ranks = (log_probs > chosen[:, None]).sum(1) + 1
        best_values, best_ids = log_probs.topk(top, dim=-1) if top > 0 else (None, None)
        for row, (token, value, rank) in enumerate(zip(targets.tolist(), chosen.tolist(), ranks.tolist(),
                                                        strict=True)):
            alternatives = [] if best_ids is None or best_values is None else list(
                zip(best_ids[row].tolist(), best_values[row].tolist(), strict=True))
            entries.append(scored_entry(token, value, rank, alternatives, names))
    return PromptLogprobs(tokens=entries)


def from_engine(ids: list[int], tensors: list[Any], top: int, names: TokenBytes) -> PromptLogprobs:
    """vLLM's prompt logprobs, gathered over its prefill chunks: per position after the first, the prompt token's
    id, logprob and rank, then the `top` likeliest."""
    entries = [first_entry(ids[0], names)]
    for part in tensors:
        token_ids, values, ranks = part.logprob_token_ids.tolist(), part.logprobs.tolist(), part.selected_token_ranks
        for row, rank in enumerate(ranks.tolist()):
            alternatives = list(zip(token_ids[row][1:top + 1], values[row][1:top + 1], strict=True))
            entries.append(scored_entry(token_ids[row][0], values[row][0], int(rank), alternatives, names))
    return PromptLogprobs(tokens=entries[:len(ids)])
