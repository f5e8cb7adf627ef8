"""Wire types between the API and the workers: the job in a model's stream and the events on a reply channel.

Both travel as JSON so `redis-cli XRANGE` and `SUBSCRIBE` show readable text. Every job carries a version `v`;
a worker answers a job of a version it does not know with an error event instead of guessing. New optional
fields may be added without a version bump (decoders ignore what they do not know).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

JOB_VERSION = 1
#: No tokenizer packs more characters than this into one token: a prompt longer than MAX_SEQ_LEN times this many
#: characters cannot fit the context, and is refused without tokenizing it (by the API, and again by a worker).
MAX_CHARS_PER_TOKEN = 64
#: JSON values (objects, arrays, scalars, keys) a request's tool and response schemas may hold in all: grammar
#: compilation time grows with them, so larger schemas are refused before anything is compiled.
MAX_SCHEMA_NODES = 4000


def prompt_too_long(chars: int, max_seq_len: int) -> str | None:
    """The refusal's message when a prompt of `chars` characters cannot fit MAX_SEQ_LEN tokens, else None."""
    if chars <= max_seq_len * MAX_CHARS_PER_TOKEN:
        return None
    return (f"This model's maximum context length is {max_seq_len} tokens; the prompt's {chars} characters "
            "cannot fit in it.")


def text_chars(value: Any) -> int:
    """Characters in every string of a JSON value (dict keys not counted): the size of a prompt in text."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return total


def json_nodes(value: Any) -> int:
    """How many values and keys a JSON value holds, itself included."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        total += 1
        if isinstance(item, dict):
            total += len(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return total


class ToolCall(msgspec.Struct):
    """A function call the model made; `arguments` is a JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a `tool` turn: which call it answers


#: `tagged`: the output may open with <think>...</think> (Qwen3); `open`: the template opened <think> in the prompt,
#: so the output starts inside it (DeepSeek-R1); `none`: no reasoning to separate.
ReasoningMode = Literal["none", "tagged", "open"]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
GuidedKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]


class GuidedDecoding(msgspec.Struct, omit_defaults=True):
    """A constraint on the output's shape, enforced token by token: `response_format`, or vLLM's `guided_*` and
    `structured_outputs`. `text` is the regex or the Lark grammar; `whitespace` the regex of the whitespace JSON
    may hold between tokens (None: the engine's default); `param` the request field it came from (for errors)."""

    kind: GuidedKind
    schema: dict[str, Any] | None = None
    strict: bool = False
    text: str | None = None
    choices: list[str] | None = None
    whitespace: str | None = None
    param: str = "response_format"


class SamplingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What shapes one sequence's tokens; `temperature == 0` means greedy, `top_k == 0` means off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: list[str] = msgspec.field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None  # score the prompt too: this many alternatives per position (None: don't)
    guided: GuidedDecoding | None = None


class ChatJob(msgspec.Struct, kw_only=True):
    """One generation request as queued in `keys.chat_stream(model)` under the field `job`: chat `messages`
    (templated by the worker), or a raw `prompt` / `prompt_ids` for legacy completions (no template)."""

    request_id: str
    model: str
    messages: list[ChatMessage]
    params: SamplingParams
    created: float
    n: int = 1
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    echo: bool = False
    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions, passed to the chat template
    tool_choice: str | dict[str, Any] | None = None  # "none" | "auto" | "required" | {"function": {"name"}}
    parallel_tool_calls: bool = True
    task: Literal["generate", "tokenize", "detokenize"] = "generate"
    add_special_tokens: bool = True  # a raw prompt (completions, tokenize) gets the tokenizer's special tokens
    add_generation_prompt: bool = True  # the template opens the assistant's turn after the messages
    continue_final_message: bool = False  # ... or leaves the last message open, for the model to go on with it
    chat_template_kwargs: dict[str, Any] | None = None  # more variables for the template (enable_thinking, ...)
    deadline: float | None = None  # epoch seconds: a worker skips the job (504) once it has passed
    v: int = JOB_VERSION


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct):
    """OpenAI's chat shape for one generated token: its text, log probability, UTF-8 bytes and alternatives."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class RankedToken(msgspec.Struct):
    token_id: int
    token: str
    logprob: float


class PromptTokenLogprob(msgspec.Struct, kw_only=True):
    """One prompt token's log probability given the tokens before it, its rank among all (1: the likeliest), and
    the likeliest tokens at its position; the first token, which nothing predicts, has none."""

    token_id: int
    token: str
    logprob: float | None = None
    rank: int | None = None
    top: list[RankedToken] = msgspec.field(default_factory=list)


class PromptLogprobs(msgspec.Struct, tag_field="event", tag="prompt_logprobs", kw_only=True):
    """The prompt scored (`prompt_logprobs`, legacy `echo` with `logprobs`): sent before the request's first
    token; a worker that resumes a job may send it again (readers keep the first)."""

    tokens: list[PromptTokenLogprob]


class Accepted(msgspec.Struct, tag_field="event", tag="accepted", kw_only=True):
    """The worker tokenized the prompt and admitted the job; sent before any token."""

    prompt_tokens: int
    prompt_text: str | None = None  # the prompt as text, for legacy completions with `echo`
    reasoning: ReasoningMode = "none"  # how the output holds the model's reasoning (api/reasoning.py splits it)


class Delta(msgspec.Struct, tag_field="event", tag="delta", kw_only=True):
    """New text of choice `index`. `seq` is the index of the (last) token this event adds within its choice
    (from 0; with STREAM_INTERVAL > 1 one event adds several), so a reader drops repeats per choice: a worker that
    resumes a crashed worker's job replays the tokens already generated under the same numbers. (A worker on an
    external engine, which streams text and not tokens, numbers by character instead: `seq` is the index of the
    event's last character, and its final event's `seq` is one past it; only increasing numbers within one
    choice matter to a reader.)
    `logprobs` covers the tokens this event adds, even while their text is held back."""

    seq: int
    text: str
    completion_tokens: int
    index: int = 0
    logprobs: list[TokenLogprob] | None = None


class Finished(msgspec.Struct, tag_field="event", tag="done", kw_only=True):
    """The last event of one choice, with its last piece of text (maybe empty); a request with `n` choices
    is complete after `n` of these."""

    seq: int
    text: str
    finish_reason: Literal["stop", "length", "tool_calls"]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] | None = None


class Failed(msgspec.Struct, tag_field="event", tag="error", kw_only=True):
    """The request failed; fields map one to one onto the OpenAI error envelope."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None


class EmbedJob(msgspec.Struct, kw_only=True):
    """Texts to embed, queued in `keys.embed_stream(model)`; `truncate` false means too long is a 400."""

    request_id: str
    model: str
    texts: list[str]
    created: float
    truncate: bool = False
    dimensions: int | None = None
    token_inputs: list[list[int]] | None = None  # token-id inputs, decoded by the worker's tokenizer
    # The client's input index of each text, when the API sends only the inputs its cache lacks: errors name
    # the client's index (None: the texts are the whole request, in order).
    positions: list[int] | None = None
    v: int = JOB_VERSION


class RerankJob(msgspec.Struct, kw_only=True):
    """A query and documents to score, queued in `keys.rerank_stream(model)`."""

    request_id: str
    model: str
    query: str
    documents: list[str]
    created: float
    truncate: bool = False
    v: int = JOB_VERSION


class Embedded(msgspec.Struct, tag_field="event", tag="embedded", kw_only=True):
    """Unit-length vectors, row after row, as little-endian float32 bytes (base64 in JSON)."""

    vectors: bytes
    dim: int
    prompt_tokens: int
    tokens: list[int] | None = None  # per input (after truncation): a cached vector still reports its tokens


class Scored(msgspec.Struct, tag_field="event", tag="scored", kw_only=True):
    """Relevance in 0..1 per document, in the order given."""

    scores: list[float]
    prompt_tokens: int


class Tokenized(msgspec.Struct, tag_field="event", tag="tokenized", kw_only=True):
    """The answer to a `tokenize` job (`tokens`) or a `detokenize` job (`text`)."""

    tokens: list[int]
    text: str | None = None
    max_model_len: int = 0


Event = Accepted | PromptLogprobs | Delta | Finished | Failed | Tokenized | Embedded | Scored


class WorkerInfo(msgspec.Struct, kw_only=True):
    """What a worker writes under `keys.worker_heartbeat(worker_id)` every few seconds, with a TTL."""

    worker_id: str
    kind: Literal["chat", "embed", "rerank"]
    model: str
    device: str
    dtype: str
    hostname: str
    pid: int
    started: float
    active_sequences: int = 0  # admitted and not yet answered
    # What the engine reports of them: computing now, waiting for room (vLLM's scheduler; native: prompts not
    # yet prefilled), the share of its KV-cache pool in use (None: the engine has no fixed pool).
    running_sequences: int = 0
    waiting_sequences: int = 0
    kv_cache_usage: float | None = None
    max_batch_size: int = 0
    decode_steps: int = 0
    decoded_tokens: int = 0
    prefilled_tokens: int = 0
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    prefix_cache_bytes: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_query_tokens: int = 0  # prompt tokens looked up in the prefix cache since start
    prefix_cache_hit_tokens: int = 0  # of which found there
    rss_bytes: int = 0
    device_memory_used_bytes: int | None = None
    device_memory_total_bytes: int | None = None
    revision: str = ""  # the loaded model's version: part of every response-cache key
    jobs_done: int = 0  # stream entries answered and acknowledged since start
    vocab_size: int = 0  # token ids the model accepts (0: not announced); the API refuses others before queueing
    # Rates over the last heartbeat interval, computed by the worker from its own counters (so a reader needs no
    # history): decoded tokens per second (inputs per second for embed and rerank workers), and the worker
    # process's CPU use (100 = one core busy).
    tokens_per_s: float = 0.0
    jobs_per_s: float = 0.0
    cpu_percent: float = 0.0
    beat_interval_s: float = 0.0  # how often this worker beats: a reader can tell a late beat from a dead worker
    beat_at: float = 0.0  # unix time of this beat (the worker's clock)
    # Fleets and hot swap (workers/host.py). An empty `model` is a worker that serves nothing right now (after an
    # unload, or while it loads `loading`); readers that route requests skip it.
    # What runs the model: chat "native" (transformers here), "vllm" (vLLM's engine in the worker's process) or
    # "external" (an engine server such as `max serve`),
    # embeddings "fastembed" or "torch"; and why (chat: the backend choice, README "Backends").
    backend: str = ""
    backend_reason: str = ""
    loading: str = ""  # the model this worker is loading now
    last_error: str = ""  # why its last control command failed (empty when it succeeded)
    # Memory the loaded model takes: parameter and buffer bytes (torch backends), and how much the process's RSS
    # grew while loading it (every backend; on CUDA the weights live in device memory instead).
    params_bytes: int = 0
    buffers_bytes: int = 0
    load_rss_delta_bytes: int = 0
    load_s: float = 0.0

_job_decoder = msgspec.json.Decoder(ChatJob)
_event_decoder = msgspec.json.Decoder(Event)
_worker_decoder = msgspec.json.Decoder(WorkerInfo)
_encoder = msgspec.json.Encoder()


def encode(obj: msgspec.Struct) -> bytes:
    return _encoder.encode(obj)


def decode_job(data: bytes | str) -> ChatJob:
    return _job_decoder.decode(data)


def decode_event(data: bytes | str) -> Event:
    return _event_decoder.decode(data)


def decode_worker(data: bytes | str) -> WorkerInfo:
    return _worker_decoder.decode(data)
