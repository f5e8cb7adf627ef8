"""OpenAI chat-completion request and response types (msgspec), and their validation.

Unknown fields are accepted and ignored (clients add their own). A known OpenAI field that Axion does not
implement yet is refused with a 400 naming it when its value would change the result: silently ignoring
`tools` or `logprobs` would hand the client a wrong answer that looks right.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import msgspec

from api.errors import APIError, from_decode_error
from api.unserved import CHAT_UNSERVED, VLLM_UNSERVED, VllmFields, refuse_unserved
from common.protocol import TokenLogprob

if TYPE_CHECKING:
    from api.protocol_legacy import CompletionRequest

Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]  # 0 keeps only the most likely token, as OpenAI
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
ChoiceCount = Annotated[int, msgspec.Meta(ge=1, le=128)]
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]
Bias = Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, msgspec.Meta(gt=0.0, le=10.0)]
TokenId = Annotated[int, msgspec.Meta(ge=0)]
TopK = Annotated[int, msgspec.Meta(ge=-1)]  # -1 and 0 are off
StopText = Annotated[str, msgspec.Meta(min_length=1)]

T = TypeVar("T")
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 4
MAX_TOOLS = 128  # OpenAI's limit


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str


class MessageToolCall(msgspec.Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class RequestMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(msgspec.Struct, omit_defaults=True):
    """Unset fields are omitted and OpenAI's field order kept: the chat template renders what the client sent."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(msgspec.Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    function: NamedFunction
    type: Literal["function"] = "function"


class JsonSchemaFormat(msgspec.Struct):
    name: str
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far


def usage_options(req: ChatCompletionRequest | CompletionRequest) -> tuple[bool, bool]:
    """(a last chunk with the usage, the usage so far in every chunk) a stream request asks for."""
    opts = req.stream_options
    return (bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats))


class ChatCompletionRequest(VllmFields, kw_only=True):
    model: str
    messages: list[RequestMessage]
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    stop: StopText | Annotated[list[StopText], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: ChoiceCount | None = None
    user: str | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None
    # Extras sent by benchmark clients (vLLM's bench, guidellm).
    top_k: TopK | None = None
    min_tokens: NonNegativeInt | None = None
    ignore_eos: bool | None = None
    repetition_penalty: RepetitionPenalty | None = None
    min_p: Probability | None = None
    stop_token_ids: list[TokenId] | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat-template options (api/template.py), and `echo`: the answer starts with the last message's text
    # when that message is the assistant's.
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False
    # Fields not served (api/unserved.py CHAT_UNSERVED): refused when set to anything but their neutral value.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    add_special_tokens: Any = None



def decode_chat_request(body: bytes) -> ChatCompletionRequest:
    """Decode and validate a request body; every problem is an APIError(400) naming the field."""
    req = decode_body(body, ChatCompletionRequest)
    validate_chat_request(req)
    return req


def validate_chat_request(req: ChatCompletionRequest) -> None:
    refuse_unserved(req, CHAT_UNSERVED | VLLM_UNSERVED)
    if not req.model.strip():
        raise APIError(400, "'model' must be a non-empty string.", param="model", code="invalid_value")
    validate_messages(req.messages)
    validate_sampling(req)
    validate_tools(req)
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        raise APIError(400, "'response_format.json_schema' is required for type 'json_schema'.",
                       param="response_format.json_schema", code="invalid_value")
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs",
                       code="invalid_value")


def validate_tools(req: ChatCompletionRequest) -> None:
    names = [t.function.name for t in req.tools or []]
    if len(names) > MAX_TOOLS:
        raise APIError(400, f"'tools' holds at most {MAX_TOOLS} functions.", param="tools", code="invalid_value")
    if any(not n or not all(c.isascii() and (c.isalnum() or c in "_-") for c in n) or len(n) > 64 for n in names):
        raise APIError(400, "Tool names must be 1-64 characters of a-z, A-Z, 0-9, '_' and '-'.", param="tools",
                       code="invalid_value")
    choice = req.tool_choice
    if choice not in (None, "none", "auto") and not names:
        raise APIError(400, "'tool_choice' needs 'tools'.", param="tool_choice", code="invalid_value")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise APIError(400, f"'tool_choice' names '{choice.function.name}', which is not in 'tools'.",
                       param="tool_choice", code="invalid_value")


def validate_messages(messages: list[RequestMessage]) -> None:
    if not messages:
        raise APIError(400, "'messages' must contain at least one message.", param="messages",
                       code="invalid_value")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if msg.role not in ROLES:
            raise APIError(400, f"Invalid role '{msg.role}' in {where}; expected one of {', '.join(ROLES)}.",
                           param=f"{where}.role", code="invalid_value")
        if msg.tool_calls and msg.role != "assistant":
            raise APIError(400, f"Only assistant messages carry 'tool_calls' ({where}).",
                           param=f"{where}.tool_calls", code="invalid_value")
        if msg.role == "tool" and not msg.tool_call_id:
            raise APIError(400, f"A tool message needs 'tool_call_id' ({where}).", param=f"{where}.tool_call_id",
                           code="invalid_value")
        if msg.content is None and msg.role == "assistant" and msg.tool_calls:
            continue
        if isinstance(msg.content, list):
            for j, part in enumerate(msg.content):
                if part.type != "text":
                    raise APIError(400, f"Content part type '{part.type}' is not supported; only 'text'.",
                                   param=f"{where}.content[{j}].type", code="unsupported_parameter")
                if part.text is None:
                    raise APIError(400, f"A 'text' content part needs a 'text' string ({where}.content[{j}]).",
                                   param=f"{where}.content[{j}].text", code="invalid_value")
        elif msg.content is None:
            raise APIError(400, f"{where} has no content.", param=f"{where}.content", code="invalid_value")


def validate_sampling(req: ChatCompletionRequest | CompletionRequest) -> None:
    """Checks that chat and legacy completions share (their fields of the same names)."""
    stops = stop_list(req)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"'stop' accepts at most {MAX_STOP_SEQUENCES} sequences.", param="stop",
                       code="invalid_value")
    if any(not s for s in stops):
        raise APIError(400, "'stop' sequences must be non-empty strings.", param="stop", code="invalid_value")
    if req.top_k is not None and req.top_k < -1:
        raise APIError(400, "'top_k' must be -1 or 0 (off) or a positive integer.", param="top_k",
                       code="invalid_value")
    for key in req.logit_bias or {}:
        if not (key.isascii() and key.isdigit()):  # str.isdigit alone passes "²" and "٣", which int() reads
            raise APIError(400, f"'logit_bias' keys must be token ids; got {key!r}.", param="logit_bias",
                           code="invalid_value")
    if req.prompt_logprobs is not None and req.stream:
        raise APIError(400, "'prompt_logprobs' is not available when 'stream' is true.", param="prompt_logprobs",
                       code="invalid_value")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true.", param="stream_options",
                       code="invalid_value")


def stop_list(req: ChatCompletionRequest | CompletionRequest) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


def prompt_scoring(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    """Alternatives per prompt position the answer shows (None: the prompt is not scored): vLLM's
    `prompt_logprobs`, or legacy `echo` with `logprobs` (the echoed prompt then carries its logprobs)."""
    wanted = req.prompt_logprobs
    if not isinstance(req, ChatCompletionRequest) and req.echo and req.logprobs is not None:
        wanted = max(wanted or 0, req.logprobs)
    return wanted


def output_limit(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    """`max_completion_tokens` wins over the older `max_tokens`."""
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def forces_tool(req: ChatCompletionRequest) -> bool:
    """`tool_choice` makes the model call a tool (`required`, or a named function)."""
    return req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)


def min_output(req: ChatCompletionRequest | CompletionRequest) -> int:
    """`min_tokens`, capped by the output limit: the output may end at `max_tokens` before it (vLLM refuses)."""
    limit = output_limit(req)
    return min(req.min_tokens or 0, limit) if limit is not None else req.min_tokens or 0


def message_text(msg: RequestMessage) -> str:
    if isinstance(msg.content, list):
        return "".join(part.text or "" for part in msg.content)
    return msg.content or ""


# ---- responses -------------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ToolCallOut(msgspec.Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class AssistantMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    reasoning_content: str | None = None


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprob]


class PromptLogprob(msgspec.Struct):
    """vLLM's entry for one token at one prompt position (`prompt_logprobs`)."""

    logprob: float
    rank: int | None
    decoded_token: str


VllmPromptLogprobs = list[dict[str, PromptLogprob] | None]


class Choice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(msgspec.Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: VllmPromptLogprobs | None = None  # vLLM's, when asked


class DeltaToolCall(msgspec.Struct):
    index: int
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChoiceDelta(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    reasoning_content: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None


class ChatCompletionUsageChunk(msgspec.Struct):
    """Chunks sent when `stream_options.include_usage` is true carry `usage` (null until the last one)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None
    system_fingerprint: str | None = None


class Model(msgspec.Struct, omit_defaults=True):
    """OpenAI's model object, plus what a fleet operator wants to see: the kind of model (`chat`, `embedding`,
    `rerank`), the backend serving it, and for an alias the served model it stands for (`root`, as vLLM names
    it); clients ignore fields they do not know."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    kind: str | None = None
    backend: str | None = None
    root: str | None = None
    backend_reason: str | None = None  # why this backend (chat: the choice, e.g. "fallback: ...")


class ModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[Model]


_decoders: dict[type, msgspec.json.Decoder] = {}


def _integral_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    return value


def decode_body(body: bytes, kind: type[T]) -> T:
    """Decode a request body into `kind`; every problem is an APIError(400) naming the field."""
    if not body.strip():
        raise APIError(400, "The request body is empty; expected a JSON object.", code="invalid_json")
    decoder = _decoders.get(kind) or _decoders.setdefault(kind, msgspec.json.Decoder(kind))
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        if "got `float`" not in str(exc):
            raise from_decode_error(exc) from None
        try:  # JSON Schema (and pydantic) take 3.0 as the integer 3: so do we
            return decoder.decode(msgspec.json.encode(_integral_floats_as_ints(msgspec.json.decode(body))))
        except msgspec.DecodeError as again:
            raise from_decode_error(again) from None
    except UnicodeDecodeError:
        raise APIError(400, "The body is not valid UTF-8.", code="invalid_json") from None
    except msgspec.DecodeError as exc:
        raise from_decode_error(exc) from None
    except RecursionError:  # msgspec's answer to very deep nesting: the client's mistake, not a 500
        raise APIError(400, "The JSON body is nested too deeply.", code="invalid_json") from None
