"""A scored prompt (the worker's `PromptLogprobs`) in the two shapes clients read: the legacy completions'
logprobs of an echoed prompt (OpenAI), and `prompt_logprobs` (vLLM: per position, token id -> its entry)."""

from __future__ import annotations

from api import protocol_legacy as lg
from api.protocol import PromptLogprob, VllmPromptLogprobs
from common.protocol import PromptLogprobs


def vllm_shape(scores: PromptLogprobs) -> VllmPromptLogprobs:
    """None for the first token; then the prompt token's entry and the likeliest ones (ranks 1, 2, ...)."""
    out: VllmPromptLogprobs = []
    for entry in scores.tokens:
        if entry.logprob is None:
            out.append(None)
            continue
        position = {str(alt.token_id): PromptLogprob(alt.logprob, rank, alt.token)
                    for rank, alt in enumerate(entry.top, start=1)}
        position[str(entry.token_id)] = PromptLogprob(entry.logprob, entry.rank, entry.token)
        out.append(position)
    return out


def legacy_shape(scores: PromptLogprobs) -> lg.LegacyLogprobs:
    """The echoed prompt's part of a legacy `logprobs`: the first token unscored (null), offsets from 0, and each
    position's alternatives keyed by text with the prompt token among them (as for sampled tokens)."""
    out = lg.LegacyLogprobs([], [], [], [])
    offset = 0
    for entry in scores.tokens:
        out.tokens.append(entry.token)
        out.token_logprobs.append(entry.logprob)
        out.text_offset.append(offset)
        offset += len(entry.token)
        if entry.logprob is None:
            out.top_logprobs.append(None)
            continue
        top: dict[str, float] = {}
        for text, value in [*((alt.token, alt.logprob) for alt in entry.top), (entry.token, entry.logprob)]:
            top[text] = max(value, top.get(text, value))
        out.top_logprobs.append(top)
    return out


def joined(first: lg.LegacyLogprobs, then: lg.LegacyLogprobs) -> lg.LegacyLogprobs:
    return lg.LegacyLogprobs(first.tokens + then.tokens, first.token_logprobs + then.token_logprobs,
                             first.top_logprobs + then.top_logprobs, first.text_offset + then.text_offset)
