"""A request as the engine sees it: one Sequence per choice (`n`), grouped so they answer as one job.

Admission happens here: apply the chat template, check the lengths and the token ids the request names, and
build the `n` sequences. Sibling `i` samples with seed `seed + i`, so `n` choices differ yet are reproducible,
each token's draw seeded by its position too (sampling.token_seed), so a job resumed after a crash goes on
exactly as it would have.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from common.protocol import (
    MAX_SCHEMA_NODES,
    THINK_OPEN,
    ChatJob,
    ChatMessage,
    Delta,
    Event,
    Failed,
    Finished,
    ReasoningMode,
    SamplingParams,
    Tokenized,
    TokenLogprob,
    json_nodes,
    prompt_too_long,
    text_chars,
)
from workers.chat import tools
from workers.chat.grammar import Grammar, GrammarCompiler, Matcher
from workers.chat.logprobs import TokenBytes, token_logprob
from workers.chat.sampling import make_generator
from workers.chat.text import TextTracker


@dataclass(eq=False)
class RequestGroup:
    """What the `n` sequences of one request share: the job's id and stream entry."""

    request_id: str
    size: int
    tag: Any = None  # the runner's handle (the stream entry id)
    left: int = 0  # sequences not yet released
    deadline: float | None = None  # epoch seconds (from the job)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    generator: torch.Generator
    text: TextTracker
    group: RequestGroup
    index: int = 0
    seed: int | None = None  # this choice's seed (the request's + index); None: its generator's own stream
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    error: str | None = None
    cache: DynamicCache | None = None  # own KV cache while the prompt is prefilled
    computed: int = 0  # positions in the KV cache: prompt tokens while prefilling, then every token fed since
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    siblings: list[Sequence] = field(default_factory=list)  # the other choices, on choice 0 only
    # The token being sampled: the log-softmax of its raw logits (native), or its entry as the engine computed it.
    pending_logprobs: torch.Tensor | TokenLogprob | None = None
    echo_text: str | None = None  # legacy completions with `echo`: the prompt as text, sent with `accepted`
    scores_prompt: bool = False  # its prompt's logprobs are still to be sent (`prompt_logprobs`; choice 0 only)
    reasoning: ReasoningMode = "none"  # sent with `accepted`: where the output's reasoning is (`reasoning_mode`)
    matcher: Matcher | None = None  # structured output: which tokens may come next
    tool_format: tools.ToolFormat | None = None  # set when the output may hold tool calls to parse
    resume: list[int] = field(default_factory=list)  # tokens a crashed worker generated: replayed, not sampled
    recorded: int = 0  # output tokens already written to the request's progress list in Redis
    progress_ttl_set: bool = False  # this worker set the list's TTL (each worker does, with its first push)
    held: Delta | None = None  # STREAM_INTERVAL: tokens not yet published, merged (workers/chat/step_publish.py)
    sent: int = 0  # output tokens already published
    handle: Any = None  # the engine's own handle on this choice (vLLM: its request's output queue)

    @property
    def prefill_ids(self) -> list[int]:
        """What the KV cache is built from: the prompt, plus all but the last resumed token (which is fed to
        the first decoding step, as a freshly sampled token would be)."""
        return self.prompt_ids + self.resume[:-1] if self.resume else self.prompt_ids

    @property
    def tag(self) -> Any:
        return self.group.tag

    @tag.setter
    def tag(self, value: Any) -> None:
        self.group.tag = value



def _template_message(m: ChatMessage, tokenizer: Any) -> dict[str, Any]:
    """A message as Hugging Face chat templates take it; tool-call arguments as a dict, as they expect."""
    out: dict[str, Any] = {"role": _role(m.role, tokenizer), "content": m.content}
    if m.name:
        out["name"] = m.name
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": _json_or_text(c.arguments)}}
                             for c in m.tool_calls]
    return out


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _role(role: str, tokenizer: Any) -> str:
    """OpenAI's `developer` role is `system` to templates that do not know it (most open models)."""
    if role == "developer" and "developer" not in (tokenizer.chat_template or ""):
        return "system"
    return role


def prepare(job: ChatJob, tokenizer: Any, max_seq_len: int, vocab_size: int, device: torch.device,
            grammars: Callable[[], GrammarCompiler] | None = None) -> Sequence | Failed:
    """Choice 0 of the request (its siblings on `.siblings`), or the Failed event that refuses it."""
    refused = refuse_oversized(job, max_seq_len)
    if refused is not None:
        return refused
    params = job.params
    calling = bool(job.tools) and job.tool_choice != "none"
    fmt = tools.detect_format(tokenizer.chat_template) if calling else None
    grammar: Grammar | None = None
    try:
        forced = tools.forcing_grammar(job.tools or [], job.tool_choice or "auto", job.parallel_tool_calls,
                                       fmt) if fmt else None
        if grammars is not None and forced is not None:
            grammar = grammars().lark(forced)
        elif grammars is not None and params.guided is not None:
            grammar = grammars().guided(params.guided)
    except (ValueError, KeyError, IndexError) as exc:
        param = params.guided.param if params.guided is not None else "tools"
        return Failed(status=400, param=param, code="invalid_schema",
                      message=f"The output constraint cannot be enforced: {exc}")
    for name, ids in (("logit_bias", list(params.logit_bias)), ("stop_token_ids", params.stop_token_ids)):
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            return Failed(status=400, param=name, code="invalid_value",
                          message=f"Token id {bad[0]} in '{name}' is outside the vocabulary (0..{vocab_size - 1}).")
    prompt = _prompt_ids(job, tokenizer, vocab_size)
    if isinstance(prompt, Failed):
        return prompt
    prompt_ids = prompt
    wanted = params.max_tokens
    if len(prompt_ids) + (wanted or 1) > max_seq_len:
        return Failed(status=400, code="context_length_exceeded", param="messages" if job.messages else "prompt",
                      message=(f"This model's maximum context length is {max_seq_len} tokens. However, "
                               f"you requested {len(prompt_ids) + (wanted or 0)} tokens "
                               f"({len(prompt_ids)} in the messages, {wanted or 0} in the completion)."))
    group = RequestGroup(request_id=job.request_id, size=job.n, left=job.n, deadline=job.deadline)
    choices = [
        Sequence(request_id=job.request_id, prompt_ids=prompt_ids, params=params, group=group, index=i,
                 max_new_tokens=wanted or max_seq_len - len(prompt_ids),
                 seed=None if params.seed is None else params.seed + i,
                 generator=make_generator(None if params.seed is None else params.seed + i, device),
                 text=TextTracker(tokenizer, params.stop, tools.markers(fmt) if fmt else None,
                                  hold_leading_json=fmt == "llama3"),
                 matcher=grammar.matcher() if grammar else None, tool_format=fmt)
        for i in range(job.n)
    ]
    choices[0].siblings = choices[1:]
    choices[0].reasoning = reasoning_mode(job, tokenizer, prompt_ids)
    choices[0].scores_prompt = params.prompt_logprobs is not None
    if job.echo:
        choices[0].echo_text = job.prompt if job.prompt is not None else tokenizer.decode(prompt_ids)
    return choices[0]


def reasoning_mode(job: ChatJob, tokenizer: Any, prompt_ids: list[int]) -> ReasoningMode:
    """Where a chat answer's reasoning is, told by the model's chat template: it writes <think> (Qwen3, DeepSeek-R1)
    and either leaves it open at the end of the prompt or lets the model open it."""
    if job.prompt is not None or job.prompt_ids is not None or THINK_OPEN not in (tokenizer.chat_template or ""):
        return "none"
    tail = tokenizer.decode(prompt_ids[-16:]).rstrip()
    return "open" if tail.endswith(THINK_OPEN) else "tagged"


def eos_token_ids(tokenizer: Any, *configs: Any) -> list[int]:
    """Every id that ends a turn: the configs' `eos_token_id` (an id or a list; generation config first) and the
    tokenizer's."""
    ids: set[int] = set()
    for config in configs:
        value = getattr(config, "eos_token_id", None) if config is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def refuse_oversized(job: ChatJob, max_seq_len: int) -> Failed | None:
    """The 400 for a prompt that cannot fit the context whatever its tokens, or for schemas too large to compile,
    found before any tokenizing or compiling (a job the API did not check, such as a batch line, comes here)."""
    chars = text_chars(job.prompt) if job.prompt is not None else text_chars([m.content for m in job.messages])
    if (problem := prompt_too_long(chars, max_seq_len)) is not None:
        return Failed(status=400, param="prompt" if job.prompt is not None else "messages",
                      code="context_length_exceeded", message=problem)
    guided = job.params.guided
    nodes = json_nodes(job.tools or []) + json_nodes(guided.schema if guided is not None else None)
    if nodes > MAX_SCHEMA_NODES:
        return Failed(status=400, param="tools" if job.tools else "response_format", code="invalid_schema",
                      message=f"The schemas hold {nodes} JSON values; at most {MAX_SCHEMA_NODES} are accepted.")
    return None


def tokenize(job: ChatJob, tokenizer: Any, max_seq_len: int, vocab_size: int) -> Tokenized | Failed:
    """A `tokenize` job (chat messages through the template, or a raw prompt) or a `detokenize` job."""
    if job.task == "tokenize" and (refused := refuse_oversized(job, max_seq_len)) is not None:
        return refused
    if job.task == "detokenize":
        ids = job.prompt_ids or []
        if any(not 0 <= i < vocab_size for i in ids):
            return Failed(status=400, param="tokens", code="invalid_value",
                          message=f"Token ids must be in 0..{vocab_size - 1}.")
        return Tokenized(tokens=ids, text=tokenizer.decode(ids), max_model_len=max_seq_len)
    if job.prompt is not None:
        ids = [int(t) for t in tokenizer(job.prompt, add_special_tokens=job.add_special_tokens)["input_ids"]]
        return Tokenized(tokens=ids, max_model_len=max_seq_len)
    prompt = _prompt_ids(job, tokenizer, vocab_size)
    return prompt if isinstance(prompt, Failed) else Tokenized(tokens=prompt, max_model_len=max_seq_len)


def _prompt_ids(job: ChatJob, tokenizer: Any, vocab_size: int) -> list[int] | Failed:
    """Token ids as given, a raw prompt tokenized (with the tokenizer's special tokens), or the chat template."""
    if job.prompt_ids is not None:
        bad = [i for i in job.prompt_ids if not 0 <= i < vocab_size]
        if bad or not job.prompt_ids:
            return Failed(status=400, param="prompt", code="invalid_value",
                          message=f"Prompt token ids must be in 0..{vocab_size - 1} and not empty.")
        return list(job.prompt_ids)
    if job.prompt is not None:
        return [int(t) for t in tokenizer(job.prompt, add_special_tokens=job.add_special_tokens)["input_ids"]]
    messages = [_template_message(m, tokenizer) for m in job.messages]
    try:
        ids = tokenizer.apply_chat_template(messages, tools=job.tools or None, tokenize=True, return_dict=False,
                                            add_generation_prompt=job.add_generation_prompt,
                                            continue_final_message=job.continue_final_message,
                                            **(job.chat_template_kwargs or {}))
    except Exception as exc:  # a template that refuses these messages (roles, order) is the client's 400
        return Failed(status=400, message=f"The chat template rejected the messages: {exc}",
                      param="messages", code="invalid_messages")
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def advance(seq: Sequence, token: int, eos_ids: list[int], max_seq_len: int, token_bytes: TokenBytes) -> Event:
    """Record a sampled token and turn it into the sequence's next event."""
    if seq.error is not None:
        seq.finish_reason = "error"
        return Failed(status=500, message=seq.error, type="server_error", code="sampling_error")
    seq.output_ids.append(token)
    logprobs = _logprobs(seq, token, token_bytes)
    if seq.matcher is not None and not seq.matcher.accept(token):
        seq.finish_reason = "error"
        return Failed(status=500, message="The output left the required format.", type="server_error",
                      code="grammar_error")
    is_eos = (token in eos_ids and not seq.params.ignore_eos) or token in seq.params.stop_token_ids
    text = seq.text.update(seq.output_ids[:-1] if is_eos else seq.output_ids)
    if is_eos or seq.text.stopped or (seq.matcher is not None and seq.matcher.is_terminated()):
        seq.finish_reason = "stop"
    elif len(seq.output_ids) >= seq.max_new_tokens or len(seq.prompt_ids) + len(seq.output_ids) >= max_seq_len:
        seq.finish_reason = "length"
    calls = None
    if seq.finish_reason is not None and seq.tool_format is not None:
        content, calls = tools.parse(seq.text.text, seq.tool_format)
        if calls:
            seq.finish_reason = "tool_calls"
            text += content[seq.text.sent:]
    if seq.finish_reason is None:
        return Delta(seq=len(seq.output_ids) - 1, text=text, completion_tokens=len(seq.output_ids), index=seq.index,
                     logprobs=logprobs)
    if not seq.text.stopped and not calls:
        text += seq.text.flush()
    return Finished(seq=len(seq.output_ids) - 1, text=text, finish_reason=seq.finish_reason,  # type: ignore[arg-type]
                    prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids),
                    cached_tokens=seq.cached_tokens, index=seq.index, logprobs=logprobs, tool_calls=calls or None)


def replay(seq: Sequence, advance_one: Callable[[Sequence, int], Event]) -> list[tuple[Sequence, Event]]:
    """A resumed sequence: the crashed worker's tokens again, as the same numbered events (the API drops those it
    already relayed), so text, stop strings, grammar and tool parsing end up where they were."""
    resume, seq.resume = seq.resume, []
    seq.recorded = len(resume)
    events: list[tuple[Sequence, Event]] = []
    for token in resume:
        events.append((seq, advance_one(seq, token)))
        if seq.finish_reason is not None:
            break
    return events


def finish(seq: Sequence, reason: str) -> Finished:
    """The final event of a sequence its engine ended without a token of ours saying so (vLLM's own length or
    stop): the text held back for stop strings goes out with it."""
    calls = None
    if reason == "stop" and seq.tool_format is not None:
        content, calls = tools.parse(seq.text.text, seq.tool_format)
    if calls:
        reason, text = "tool_calls", content[seq.text.sent:]
    else:
        text = "" if seq.text.stopped else seq.text.flush()
    seq.finish_reason = reason
    return Finished(seq=len(seq.output_ids), text=text, finish_reason=reason,  # type: ignore[arg-type]
                    prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids),
                    cached_tokens=seq.cached_tokens, index=seq.index, tool_calls=calls or None)


def _logprobs(seq: Sequence, token: int, token_bytes: TokenBytes) -> list[TokenLogprob] | None:
    row, seq.pending_logprobs = seq.pending_logprobs, None
    if row is None:
        return None
    if isinstance(row, TokenLogprob):
        return [row]
    return [token_logprob(row, token, seq.params.top_logprobs, token_bytes)]
