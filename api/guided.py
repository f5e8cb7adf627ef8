"""Output constraints a request may ask for: OpenAI's `response_format`, vLLM's `guided_*` fields and its newer
`structured_outputs` object, turned into the one `GuidedDecoding` both engines enforce. One constraint per
request; a field that cannot be honoured is a 400 naming it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import msgspec

from api.errors import APIError
from common.protocol import GuidedDecoding

if TYPE_CHECKING:
    from api.protocol import ChatCompletionRequest
    from api.protocol_legacy import CompletionRequest

MAX_CHOICES = 256


class StructuredOutputs(msgspec.Struct, kw_only=True):
    """vLLM's `structured_outputs`: one of json, regex, choice, grammar, json_object, with its options."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: Any = None


class GuidedFields(msgspec.Struct, kw_only=True):
    """vLLM's constraint fields, shared by chat and legacy completions (`extra_body` in the openai SDK).
    `guided_decoding_backend` is accepted and has no effect: every constraint is enforced the same way."""

    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None
    structured_outputs: StructuredOutputs | None = None


def guided_decoding(req: ChatCompletionRequest | CompletionRequest, forced_tool: bool = False) -> GuidedDecoding | None:
    """The request's one output constraint, or None; a 400 for two of them, for one beside a forced tool call,
    and for a malformed one. The whitespace settings shape JSON constraints (the other kinds have no gaps)."""
    found = [g for g in (_from_response_format(req), *_from_guided_fields(req), _from_structured(req)) if g]
    if len(found) > 1:
        raise APIError(400, f"Only one output constraint per request: '{found[0].param}' and '{found[1].param}' "
                            "are both set.", param=found[1].param, code="invalid_value")
    guided = found[0] if found else None
    if guided is not None and guided.kind in ("json_object", "json_schema"):  # other kinds have no JSON gaps
        guided.whitespace = _whitespace(req)
    if guided is not None and forced_tool:
        raise APIError(400, f"A forced 'tool_choice' cannot be combined with '{guided.param}'.", param=guided.param,
                       code="invalid_value")
    return guided


def _from_response_format(req: ChatCompletionRequest | CompletionRequest) -> GuidedDecoding | None:
    fmt = getattr(req, "response_format", None)
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema" and fmt.json_schema and fmt.json_schema.schema is not None:
        return GuidedDecoding("json_schema", fmt.json_schema.schema, bool(fmt.json_schema.strict))
    return GuidedDecoding("json_object")  # json_object, or a json_schema without a schema: any JSON object


def _from_guided_fields(req: GuidedFields) -> list[GuidedDecoding | None]:
    return [
        _json(req.guided_json, "guided_json", strict=False) if req.guided_json is not None else None,
        _text("regex", req.guided_regex, "guided_regex"),
        _choice(req.guided_choice, "guided_choice"),
        _text("grammar", req.guided_grammar, "guided_grammar"),
    ]


def _from_structured(req: GuidedFields) -> GuidedDecoding | None:
    so = req.structured_outputs
    if so is None:
        return None
    if so.structural_tag is not None:
        raise APIError(400, "'structured_outputs.structural_tag' is not supported by this server.",
                       param="structured_outputs.structural_tag", code="unsupported_parameter")
    kinds = [name for name in ("json", "regex", "choice", "grammar") if getattr(so, name) is not None]
    kinds += ["json_object"] if so.json_object else []
    if len(kinds) != 1:
        raise APIError(400, "'structured_outputs' takes exactly one of json, regex, choice, grammar and json_object.",
                       param="structured_outputs", code="invalid_value")
    param = f"structured_outputs.{kinds[0]}"
    if so.json is not None:
        return _json(so.json, param, strict=so.disable_additional_properties)
    if so.json_object:
        return GuidedDecoding("json_object", param=param)
    if so.choice is not None:
        return _choice(so.choice, param)
    kind = "regex" if so.regex is not None else "grammar"
    return _text(kind, so.regex if so.regex is not None else so.grammar, param)


def _json(schema: dict[str, Any] | str, param: str, strict: bool) -> GuidedDecoding:
    """A JSON schema, given as an object or as its JSON text; `strict` closes every object (OpenAI's strict)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError:
            schema = None  # type: ignore[assignment]
    if not isinstance(schema, dict):
        raise APIError(400, f"'{param}' must be a JSON schema object.", param=param, code="invalid_value")
    return GuidedDecoding("json_schema", schema, strict, param=param)


def _text(kind: str, text: str | None, param: str) -> GuidedDecoding | None:
    if text is None:
        return None
    if not text:
        raise APIError(400, f"'{param}' must not be empty.", param=param, code="invalid_value")
    return GuidedDecoding(kind, text=text, param=param)  # type: ignore[arg-type]


def _choice(choices: list[str] | None, param: str) -> GuidedDecoding | None:
    if choices is None:
        return None
    if not 1 <= len(choices) <= MAX_CHOICES or not all(choices):
        raise APIError(400, f"'{param}' must hold 1 to {MAX_CHOICES} non-empty strings.", param=param,
                       code="invalid_value")
    return GuidedDecoding("choice", choices=list(choices), param=param)


def _whitespace(req: GuidedFields) -> str | None:
    """The whitespace JSON may hold between tokens: vLLM's pattern fields, or none at all."""
    so = req.structured_outputs
    if so is not None and so.disable_any_whitespace:
        return ""
    if so is not None and so.whitespace_pattern is not None:
        return so.whitespace_pattern
    return req.guided_whitespace_pattern

