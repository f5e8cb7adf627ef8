"""The Responses API (`POST /v1/responses`): request and response types, and the request as a chat request.

A response runs as a chat completion of one choice: `instructions` become the system message, the stored
conversation of `previous_response_id` comes next, then the `input` items (messages, function calls and their
outputs); function tools and `text.format` map onto chat's `tools` and `response_format`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from api import protocol as p
from api.errors import APIError
from api.unserved import refuse_unserved
from common.protocol import TokenLogprob

# ---- request ----------------------------------------------------------------------------------------------


class InputContent(msgspec.Struct, kw_only=True):
    """A text part of an input message (`output_text`: an earlier answer's, sent back as history)."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: Any = None
    logprobs: Any = None


class InputMessage(msgspec.Struct, tag_field="type", tag="message", kw_only=True):
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputContent]
    id: str | None = None
    status: str | None = None


CallId = Annotated[str, msgspec.Meta(min_length=1)]


class FunctionCallInput(msgspec.Struct, tag_field="type", tag="function_call", kw_only=True):
    call_id: CallId
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputInput(msgspec.Struct, tag_field="type", tag="function_call_output", kw_only=True):
    call_id: CallId
    output: str | list[InputContent]
    id: str | None = None
    status: str | None = None


class ReasoningInput(msgspec.Struct, tag_field="type", tag="reasoning", kw_only=True):
    """An earlier answer's reasoning, sent back: accepted and left out of the prompt, as chat templates do."""

    id: str | None = None
    summary: Any = None
    content: Any = None
    encrypted_content: Any = None
    status: str | None = None


InputItem = InputMessage | FunctionCallInput | FunctionCallOutputInput | ReasoningInput


class _Items(msgspec.Struct):
    input: list[InputItem]


class ResponseTool(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    name: str


class TextFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class TextConfig(msgspec.Struct, kw_only=True):
    format: TextFormat | None = None
    verbosity: Any = None


class ResponsesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    # Text, or a list of items (typed as `InputItem` by `input_items`: a message may leave out its `type`).
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: p.PositiveInt | None = None
    temperature: p.Temperature | None = None
    top_p: p.TopP | None = None
    top_logprobs: p.TopLogprobs | None = None
    tools: list[ResponseTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    store: bool | None = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # a routing hint; prefix caching needs none
    service_tier: str | None = None
    # Not served (RESPONSES_UNSERVED): refused unless left at a value that changes nothing.
    background: Any = None
    include: Any = None
    reasoning: Any = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    truncation: Any = None


RESPONSES_UNSERVED: dict[str, tuple[Any, ...]] = {
    "background": (None, False), "include": (None, []), "reasoning": (None,), "conversation": (None,),
    "prompt": (None,), "max_tool_calls": (None,), "truncation": (None, "disabled"),
    "service_tier": (None, "auto", "default"),
}


def decode_responses_request(body: bytes) -> ResponsesRequest:
    req = p.decode_body(body, ResponsesRequest)
    refuse_unserved(req, RESPONSES_UNSERVED)
    if req.text is not None and req.text.verbosity not in (None, "medium"):
        raise APIError(400, "'text.verbosity' is not supported by this server.", param="text.verbosity",
                       code="unsupported_parameter")
    if not req.model.strip():
        raise APIError(400, "'model' must be a non-empty string.", param="model", code="invalid_value")
    input_items(req)  # checked now: a bad item is a 400 before anything is read or queued
    return req


def input_items(req: ResponsesRequest) -> list[InputItem]:
    if isinstance(req.input, str):
        return [InputMessage(role="user", content=req.input)]
    if not req.input:
        raise APIError(400, "'input' must hold at least one item.", param="input", code="invalid_value")
    items = [item if "type" in item else {**item, "type": "message"} for item in req.input]
    try:
        return msgspec.convert({"input": items}, _Items).input
    except msgspec.ValidationError as exc:
        raise p.from_decode_error(exc) from None


def _text(content: str | list[InputContent]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def input_messages(req: ResponsesRequest) -> list[p.RequestMessage]:
    """The input items as chat messages: consecutive function calls are one assistant turn, as chat has them."""
    out: list[p.RequestMessage] = []
    for item in input_items(req):
        if isinstance(item, InputMessage):
            out.append(p.RequestMessage(item.role, _text(item.content)))
        elif isinstance(item, FunctionCallInput):
            call = p.MessageToolCall(item.call_id, p.FunctionCall(item.name, item.arguments))
            last = out[-1] if out else None
            if last is not None and last.role == "assistant" and last.tool_calls:
                last.tool_calls.append(call)
            else:
                out.append(p.RequestMessage("assistant", None, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputInput):
            out.append(p.RequestMessage("tool", _text(item.output), tool_call_id=item.call_id))
    return out


def chat_request(req: ResponsesRequest, history: list[p.RequestMessage]) -> p.ChatCompletionRequest:
    """The chat completion this response runs as; checked as chat requests are."""
    system = [p.RequestMessage("system", req.instructions)] if req.instructions else []
    fmt = req.text.format if req.text is not None else None
    response_format = None
    if fmt is not None and fmt.type != "text":
        schema = p.JsonSchemaFormat(fmt.name or "output", fmt.schema, fmt.strict, fmt.description)
        response_format = p.ResponseFormat(fmt.type, schema if fmt.type == "json_schema" else None)
    choice = req.tool_choice
    prompt = [*history, *input_messages(req)]
    if not prompt:
        raise APIError(400, "'input' holds nothing to answer: earlier reasoning alone is no prompt.", param="input",
                       code="invalid_value")
    chat = p.ChatCompletionRequest(
        model=req.model, messages=[*system, *prompt], temperature=req.temperature,
        top_p=req.top_p, max_tokens=req.max_output_tokens, stream=req.stream, user=req.user,
        logprobs=True if req.top_logprobs is not None else None, top_logprobs=req.top_logprobs,
        response_format=response_format, parallel_tool_calls=req.parallel_tool_calls,
        tools=[p.ToolDef(function=p.FunctionDef(t.name, t.description, t.parameters, t.strict))
               for t in req.tools] if req.tools else None,
        tool_choice=p.NamedToolChoice(p.NamedFunction(choice.name)) if isinstance(choice, FunctionChoice)
        else choice)
    p.validate_chat_request(chat)
    return chat


# ---- response ---------------------------------------------------------------------------------------------


class OutputText(msgspec.Struct, tag_field="type", tag="output_text", kw_only=True):
    text: str = ""
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[TokenLogprob] = msgspec.field(default_factory=list)


class ReasoningText(msgspec.Struct, tag_field="type", tag="reasoning_text", kw_only=True):
    text: str = ""


class MessageItem(msgspec.Struct, tag_field="type", tag="message", kw_only=True):
    id: str
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = msgspec.field(default_factory=list)


class FunctionCallItem(msgspec.Struct, tag_field="type", tag="function_call", kw_only=True):
    id: str
    call_id: str
    name: str
    arguments: str = ""
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"


class ReasoningItem(msgspec.Struct, tag_field="type", tag="reasoning", kw_only=True):
    id: str
    summary: list[Any] = msgspec.field(default_factory=list)
    content: list[ReasoningText] = msgspec.field(default_factory=list)
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"


OutputItem = MessageItem | FunctionCallItem | ReasoningItem


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


class ResponseError(msgspec.Struct):
    code: str
    message: str


class IncompleteDetails(msgspec.Struct):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputItem]
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_logprobs: int | None = None
    tools: list[ResponseTool] = msgspec.field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice = "auto"
    parallel_tool_calls: bool = True
    text: TextConfig = msgspec.field(default_factory=lambda: TextConfig(format=TextFormat(type="text")))
    store: bool = True
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    user: str | None = None
    truncation: Literal["disabled"] = "disabled"
    reasoning: None = None
    background: bool = False
    service_tier: str = "default"


class DeletedResponse(msgspec.Struct):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


class StoredResponse(msgspec.Struct):
    """What `previous_response_id` and `GET /v1/responses/{id}` read: the response, and the conversation it
    ended (its input and output as chat messages, instructions left out: each request gives its own)."""

    response: ResponseObject
    messages: list[p.RequestMessage]
    owner: str = ""  # the API key that made it (`auth.owner()`): only that key reads, continues or deletes it

