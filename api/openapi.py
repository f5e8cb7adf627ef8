"""The OpenAPI document at /schema/openapi.json, with the request bodies the handlers really take.

The handlers read the raw body and decode it with msgspec themselves (so every bad field is a 400 in OpenAI's
envelope, naming the field), which leaves Litestar nothing to document. This render plugin adds, to the schema
Litestar generates, each POST route's body as msgspec's JSON Schema of the very struct that decodes it, and the
error envelope for the 4xx answers: clients and the schemathesis fuzz test (tests/test_fuzz.py) then see the
real contract.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import msgspec
from litestar import Request
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin

from api import protocol_legacy as legacy
from api.endpoints import ENDPOINTS, REQUEST_BODIES, endpoint
from api.extension import Extension
from api.guided import MAX_CHOICES
from api.protocol import MAX_TOOLS, ROLES
from api.protocol_responses import RESPONSES_UNSERVED, InputItem
from api.serving_embed import MAX_ITEMS, MAX_TEXT_CHARS
from api.unserved import CHAT_UNSERVED, VLLM_UNSERVED
from common import VERSION
from common.model_ids import MAX_MODEL_ID_CHARS, MODEL_ID_PATTERN

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}

MODEL_ID_PARAMETER: dict[str, Any] = {
    "type": "string", "pattern": "^[A-Za-z0-9_-][A-Za-z0-9._-]*$", "maxLength": MAX_MODEL_ID_CHARS,
    "description": "A model id; one with an organisation (`org/name`) goes in the path as it is"}
ERRORS = {"400": "Invalid request: `param` names the field", "401": "Missing or unknown API key",
          "404": "Unknown model (or one this key may not use), or no such object",
          "408": "Headers or body not sent within HEADER_TIMEOUT_S / BODY_TIMEOUT_S",
          "413": "Request body too large", "415": "A body sent as anything but JSON",
          "429": "Rate limit or replica capacity reached (see Retry-After)"}
ADMIN_ERRORS = {"403": "The key is not one of ADMIN_API_KEYS"}


def add_request_bodies(schema: dict[str, Any], extensions: Sequence[Extension] = ()) -> dict[str, Any]:
    """A copy of Litestar's OpenAPI document with request bodies and the error envelope filled in."""
    doc = copy.deepcopy(schema)
    request_bodies = {**REQUEST_BODIES, **{p: t for ext in extensions for p, t in ext.bodies.items()}}
    schemas_, components = msgspec.json.schema_components([*request_bodies.values(), list[InputItem]],
                                                          ref_template="#/components/schemas/{name}")
    *bodies, items = schemas_
    _add_checked_rules(components)
    _add_response_items(components, items)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, component in components.items():
        schemas.setdefault(name, component)
    schemas["ErrorResponse"] = ERROR_SCHEMA
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    paths = doc.get("paths", {})
    for path, body in zip(request_bodies, bodies, strict=True):
        operation = paths.get(path, {}).get("post")
        if operation is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    for ext in extensions:
        for path, content in ext.uploads.items():
            if "post" in paths.get(path, {}):
                paths[path]["post"]["requestBody"] = {"required": True, "content": content}
        for path, most in ext.page_limits.items():
            for parameter in paths.get(path, {}).get("get", {}).get("parameters", []):
                if parameter.get("name") == "limit":
                    parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": most}
    for path in (path for e in ENDPOINTS if e.streams for path in e.paths):  # `stream: true`: server-sent events
        if "post" in paths.get(path, {}):
            ok = paths[path]["post"].setdefault("responses", {}).setdefault("200", {"description": "OK"})
            ok.setdefault("content", {})["text/event-stream"] = {"schema": {}}  # chunks, an error, then [DONE]
    for parameter in paths.get("/v1/models/{model_id}", {}).get("get", {}).get("parameters", []):
        parameter["schema"] = MODEL_ID_PARAMETER
    for path, item in paths.items():
        for operation in item.values():
            if isinstance(operation, dict) and "responses" in operation:
                errors = ERRORS | (ADMIN_ERRORS if path.startswith("/admin/") else {})
                for status, text in errors.items():  # replacing Litestar's own (validation) 400 shape
                    operation["responses"][status] = {
                        "description": text, "content": {"application/json": {"schema": error_ref}}}
    return doc


def _add_response_items(components: dict[str, Any], items: dict[str, Any]) -> None:
    """The Responses API's `input`: text, or items as `input_items` reads them (a message may leave out `type`)."""
    items["items"].pop("discriminator", None)
    items["minItems"] = 1
    components["InputMessage"]["required"] = [f for f in components["InputMessage"]["required"] if f != "type"]
    fields = components["ResponsesRequest"]["properties"]
    fields["input"] = {"anyOf": [{"type": "string"}, items]}
    fields["tools"]["maxItems"] = MAX_TOOLS
    for name, neutral in RESPONSES_UNSERVED.items():  # fields not served: only their neutral values pass
        fields[name] = {"enum": list(neutral)}
    components["TextConfig"]["properties"]["verbosity"] = {"enum": [None, "medium"]}
    components["ResponseTool"]["properties"]["name"] = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
    components["ResponsesRequest"]["allOf"] = [
        {"if": _given("tool_choice", {"allOf": [NOT_NULL, {"not": {"enum": ["none", "auto"]}}]}),
         "then": _given("tools", {"type": "array", "minItems": 1})}]


def _add_checked_rules(components: dict[str, Any]) -> None:
    """Rules the structs leave to code (`validate_messages`, the model-id shape), written into the schema."""
    components["RequestMessage"]["properties"]["role"] = {"enum": list(ROLES)}
    components["RequestMessage"]["allOf"] = MESSAGE_RULES
    part = components["ContentPart"]
    part["properties"]["type"] = {"enum": ["text"]}
    part["required"] = sorted({*part.get("required", []), "type", "text"})
    part["properties"]["text"] = {"type": "string"}
    components["FunctionDef"]["properties"]["name"] = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
    components["ChatCompletionRequest"]["allOf"] = [*SAMPLING_RULES, *CHAT_RULES]
    components["ResponseFormat"]["allOf"] = [
        {"if": _given("type", {"const": "json_schema"}), "then": _given("json_schema", {"type": "object"})}]
    components["CompletionRequest"]["allOf"] = [*SAMPLING_RULES, *COMPLETION_RULES]
    _add_constraint_fields(components)
    chat = components["ChatCompletionRequest"]["properties"]
    chat["messages"]["minItems"] = 1
    chat["tools"]["maxItems"] = MAX_TOOLS
    for name, neutral in CHAT_UNSERVED.items():  # fields not served: only their neutral values pass
        chat[name] = {"enum": list(neutral)}
    for fields in (chat, components["CompletionRequest"]["properties"]):
        for name, neutral in VLLM_UNSERVED.items():
            fields[name] = {"enum": list(neutral)}
    text = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS}
    components["EmbeddingRequest"]["properties"]["input"] = _inputs(text, MAX_ITEMS)
    rerank = components["RerankRequest"]["properties"]
    rerank["query"] = {"type": "string", "minLength": 1}
    score = components["ScoreRequest"]["properties"]
    score["truncate_prompt_tokens"] = {"type": "null", "description": "Not served: 'truncate: true' cuts to the "
                                       "model's limit."}
    score["text_1"] = score["text_2"] = {"anyOf": [text, {"type": "array", "items": text, "minItems": 1,
                                                          "maxItems": MAX_ITEMS}],
                                         "description": "One of either, or lists of one length (pair by pair)."}
    rerank["documents"].update(minItems=1, maxItems=MAX_ITEMS)
    components["Document"]["properties"]["text"] = text
    rerank["documents"]["items"] = {"anyOf": [text, {"$ref": "#/components/schemas/Document"}]}
    completion = components["CompletionRequest"]["properties"]
    completion["prompt"] = _inputs({"type": "string", "minLength": 1}, legacy.MAX_PROMPTS)
    completion["suffix"] = {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 0}]}
    completion["best_of"] = {"type": "null", "description": "Not served: only a best_of equal to n is accepted."}
    completion["min_tokens"]["description"] = chat["min_tokens"]["description"] = "Capped by max_tokens."
    components["TokenizeRequest"]["oneOf"] = [  # exactly one of prompt and messages
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array", "minItems": 1},
                                                  "prompt": {"type": "null"}}}]
    for path, kind in REQUEST_BODIES.items():
        served = endpoint(path)
        component = components[kind.__name__]
        model = component["properties"].get("model")
        if model is not None:
            model.update(pattern=MODEL_ID_PATTERN, maxLength=MAX_MODEL_ID_CHARS)
        if served is not None and served.kind is not None:  # the guard fills in the one model (`_fill_model`)
            component["required"] = [name for name in component.get("required", []) if name != "model"]
            model["description"] = "May be left out when one model of the endpoint's kind is served."


#: `validate_messages` in JSON Schema: only assistants call tools, a tool message names its call, and content may
#: be missing only from an assistant message that calls tools.
MESSAGE_RULES: list[dict[str, Any]] = [
    {"if": {"not": {"properties": {"role": {"const": "assistant"}}}},
     "then": {"properties": {"tool_calls": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}}}},
    {"if": {"properties": {"role": {"const": "tool"}}},
     "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string", "minLength": 1}}}},
    {"anyOf": [{"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
               {"required": ["role", "tool_calls"], "properties": {
                   "role": {"const": "assistant"}, "tool_calls": {"type": "array", "minItems": 1}}}]},
]


def _given(field: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": [field], "properties": {field: schema}}


NOT_NULL: dict[str, Any] = {"not": {"type": "null"}}
#: `validate_sampling`, `validate_tools` and friends: the rules between fields that JSON Schema can state.
SAMPLING_RULES: list[dict[str, Any]] = [
    {"if": _given("stream_options", {"type": "object"}), "then": _given("stream", {"const": True})},
    {"properties": {"logit_bias": {"anyOf": [{"type": "null"}, {"propertyNames": {"pattern": "^[0-9]+$"}}]}}},
    {"not": {"required": ["prompt_logprobs", "stream"],
             "properties": {"prompt_logprobs": NOT_NULL, "stream": {"const": True}}}},
]
CHAT_RULES: list[dict[str, Any]] = [
    {"if": _given("top_logprobs", {"type": "integer", "minimum": 1}), "then": _given("logprobs", {"const": True})},
    {"if": _given("tool_choice", {"allOf": [NOT_NULL, {"not": {"enum": ["none", "auto"]}}]}),
     "then": _given("tools", {"type": "array", "minItems": 1})},
]
COMPLETION_RULES: list[dict[str, Any]] = [
    {"if": _given("max_tokens", {"const": 0}), "then": _given("echo", {"const": True})},
]


GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
ONE_CONSTRAINT = ("vLLM's output constraint: at most one of guided_json, guided_regex, guided_choice, guided_grammar, "
                  "structured_outputs and a JSON response_format, and none with a forced tool_choice.")
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _add_constraint_fields(components: dict[str, Any]) -> None:
    """The shapes `guided_decoding` checks: JSON schemas as objects, non-empty choices, exactly one kind in
    `structured_outputs`, no structural tags. One constraint per request, none beside a forced tool call: said
    in words, because these rules beside the others make a schema too large for generators to expand."""
    choices = {"type": "array", "minItems": 1, "maxItems": MAX_CHOICES, "items": {"type": "string", "minLength": 1}}
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        fields = components[name]["properties"]
        fields["guided_json"] = {"anyOf": [{"type": "object"}, {"type": "null"}]}
        fields["guided_choice"] = {"anyOf": [choices, {"type": "null"}]}
        for field in GUIDED_FIELDS:
            fields[field]["description"] = ONE_CONSTRAINT
    so = components["StructuredOutputs"]["properties"]
    so["json"] = {"anyOf": [{"type": "object"}, {"type": "null"}]}
    so["choice"] = {"anyOf": [choices, {"type": "null"}]}
    so["structural_tag"] = {"type": "null"}
    unset = {kind: {"type": "null"} for kind in STRUCTURED_KINDS} | {"json_object": {"enum": [None, False]}}
    components["StructuredOutputs"]["oneOf"] = [
        {"required": [kind], "properties": unset | {kind: {"const": True} if kind == "json_object" else NOT_NULL}}
        for kind in STRUCTURED_KINDS]


def _inputs(text: dict[str, Any], most: int) -> dict[str, Any]:
    """One input or a list of them, each a text or a list of token ids (never a mix)."""
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    return {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": most}, ids,
                      {"type": "array", "items": ids, "minItems": 1, "maxItems": most}]}


class BodiesJsonPlugin(JsonRenderPlugin):
    """Litestar's JSON renderer, after `add_request_bodies` (computed once)."""

    def __init__(self, extensions: Sequence[Extension] = ()) -> None:
        super().__init__()
        self._extensions = extensions
        self._rendered: bytes | None = None

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        if self._rendered is None:
            self._rendered = self.render_json(request, add_request_bodies(openapi_schema, self._extensions))
        return self._rendered


def openapi_json(request: Request) -> bytes:
    """The document /schema/openapi.json serves, for another path."""
    config = request.app.openapi_config
    plugin = next(p for p in (config.render_plugins if config else []) if isinstance(p, BodiesJsonPlugin))
    return plugin.render(request, request.app.openapi_schema.to_schema())


def openapi_config(extensions: Sequence[Extension] = ()) -> OpenAPIConfig:
    return OpenAPIConfig(title="Axion", version=VERSION,
                         render_plugins=[BodiesJsonPlugin(extensions), SwaggerRenderPlugin()])
