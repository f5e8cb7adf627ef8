"""Legacy completions and vLLM's tokenize/detokenize: request and response types, and their checks."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from api.errors import APIError
from api.protocol import (
    MAX_STOP_SEQUENCES,
    Bias,
    ChoiceCount,
    FinishReason,
    NonNegativeInt,
    Penalty,
    Probability,
    RepetitionPenalty,
    RequestMessage,
    Seed,
    StopText,
    StreamOptions,
    Temperature,
    TokenId,
    ToolDef,
    TopK,
    TopLogprobs,
    TopP,
    Usage,
    VllmPromptLogprobs,
    decode_body,
    validate_sampling,
)
from api.template import TemplateFields
from api.unserved import VLLM_UNSERVED, VllmFields, refuse_unserved

# ---- legacy completions --------------------------------------------------------------------------------------

class CompletionRequest(VllmFields, kw_only=True):
    model: str
    # A string, a list of strings, token ids, or a list of token-id lists (msgspec allows one list type in a
    # union, so the shape is checked by `completion_prompts`).
    prompt: str | list[str | int | list[int]]
    max_tokens: NonNegativeInt | None = 16
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: ChoiceCount | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: TopLogprobs | None = None
    echo: bool | None = False
    stop: StopText | Annotated[list[StopText], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None
    seed: Seed | None = None
    user: str | None = None
    best_of: ChoiceCount | None = None
    suffix: str | None = None
    top_k: TopK | None = None
    min_p: Probability | None = None
    min_tokens: NonNegativeInt | None = None
    ignore_eos: bool | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop_token_ids: list[TokenId] | None = None
    add_special_tokens: bool = True  # vLLM's: the tokenizer's BOS (and the like) around a text prompt

    @property
    def top_logprobs(self) -> int:
        return self.logprobs or 0

    @property
    def max_completion_tokens(self) -> None:
        return None


MAX_PROMPTS = 64


def decode_completion_request(body: bytes) -> CompletionRequest:
    req = decode_body(body, CompletionRequest)
    refuse_unserved(req, VLLM_UNSERVED)
    prompts = completion_prompts(req)
    if not prompts or len(prompts) > MAX_PROMPTS or any(p == "" for p in prompts):
        raise APIError(400, f"'prompt' must hold 1 to {MAX_PROMPTS} non-empty prompts.", param="prompt",
                       code="invalid_value")
    if req.suffix:
        raise APIError(400, "'suffix' is not supported by this server.", param="suffix", code="unsupported_parameter")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise APIError(400, "'best_of' other than 'n' is not supported.", param="best_of",
                       code="unsupported_parameter")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "'max_tokens' 0 (score the prompt only) needs 'echo'; else it must be at least 1.",
                       param="max_tokens", code="invalid_value")
    validate_sampling(req)
    return req


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """One prompt or several: a string, token ids, a list of strings, or a list of token-id lists."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(x, int) for x in prompt):
        prompts: list[str | list[int]] = [list(prompt)] if prompt else []  # type: ignore[arg-type]
    elif all(isinstance(x, str) for x in prompt) or all(isinstance(x, list) for x in prompt):
        prompts = list(prompt)  # type: ignore[arg-type]
    else:
        raise APIError(400, "'prompt' mixes strings, token ids and token-id lists.", param="prompt",
                       code="invalid_value")
    for one in prompts:
        if isinstance(one, list) and (not one or any(not isinstance(t, int) or t < 0 for t in one)):
            raise APIError(400, "Token-id prompts must be non-empty lists of ids >= 0.", param="prompt",
                           code="invalid_value")
    return prompts


class LegacyLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token, which nothing predicts
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, omit_defaults=True):
    index: int
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: FinishReason | None
    prompt_logprobs: VllmPromptLogprobs | None = None  # vLLM's, when asked


class Completion(msgspec.Struct):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ---- tokenize / detokenize (vLLM's shapes) ----------------------------------------------------------------------


class TokenizeRequest(TemplateFields, kw_only=True):
    model: str
    prompt: str | None = None
    messages: list[RequestMessage] | None = None
    tools: list[ToolDef] | None = None
    add_special_tokens: bool = True


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str
    tokens: list[TokenId]


class DetokenizeResponse(msgspec.Struct):
    prompt: str
