"""What schemathesis's generator must know beyond the OpenAPI document (schemathesis.toml loads this file).

Some rules cannot be stated in one JSON Schema for every model of a fleet: a token id must be inside the model's
vocabulary and a prompt plus its output inside its context; a named `tool_choice` names one of the request's own
`tools`; a text is a regex in llguidance's syntax or a grammar; `text_1` pairs with `text_2`; a template does not
both open a turn and continue the last message. And "one output
constraint per request, none beside a forced tool call", stated in the schema, made it too large for the generator
to expand. A body that breaks only such a rule is refused with a 400, so schema-valid bodies are brought inside
them (ids below 256, which every vocabulary has; short prompts and outputs; a declared tool; a valid pattern);
schema-violating ones are left as generated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import schemathesis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `st run` puts its own folder first, not the checkout
from api.openapi import GUIDED_FIELDS
from api.template import RESERVED

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
MODEL_PATHS = (*GENERATION_PATHS, "/tokenize", "/detokenize", "/v1/embeddings")
SCORE_PATHS = ("/score", "/v1/score")
VALID_TEXT = {"regex": "[a-z]{1,4}", "grammar": 'start: "a" | "b"', "whitespace_pattern": " ?"}
SMALLEST_VOCABULARY = 256
MOST_TOKENS = 8  # per output and per id list: far inside any context
MOST_CHARS = 100  # per prompt text: a byte-level tokenizer makes at most 4 tokens of a character
MOST_MESSAGES = 2  # and tools, choices, prompts


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: Any) -> Any:
    """Every body is kept inside the model's vocabulary and context (no field the schema bounds changes, so a
    violation stays one); a schema-valid one is also brought inside the rules between fields. A negative case
    that comes out valid is judged as a valid one: hence the first part for all."""
    meta, body, path = case.meta, case.body, case.operation.path
    if meta is None or not isinstance(body, dict):
        return case
    if path in MODEL_PATHS:
        _inside_the_context(path, body)
    if meta.generation.mode.is_positive:
        _between_fields(path, body)
    return case


def _inside_the_context(path: str, body: dict[str, Any]) -> None:
    for field in ("prompt", "input", "tokens", "stop_token_ids", "messages"):
        if field in body:  # texts have no maxLength there but embeddings' `input`: cut them elsewhere only
            body[field] = _inside_the_model(body[field], cut_texts=field != "input" or path == "/v1/responses")
    for field in ("max_tokens", "max_completion_tokens", "min_tokens", "max_output_tokens"):
        if isinstance(body.get(field), int | float) and not isinstance(body[field], bool):
            body[field] = min(body[field], MOST_TOKENS)
    if path == "/v1/responses":
        body.setdefault("max_output_tokens", MOST_TOKENS)
        if isinstance(body.get("instructions"), str):
            body["instructions"] = body["instructions"][:MOST_CHARS]
    elif path in GENERATION_PATHS and body.get("max_completion_tokens") is None:
        body.setdefault("max_tokens", MOST_TOKENS)
    if isinstance(body.get("logit_bias"), dict):
        body["logit_bias"] = {k: v for k, v in body["logit_bias"].items() if not k.isdigit() or
                              int(k) < SMALLEST_VOCABULARY}


def _between_fields(path: str, body: dict[str, Any]) -> None:
    """What only a schema-valid body may lose: fewer messages, tools, choices and prompts, one constraint."""
    if path in SCORE_PATHS:
        _pair_texts(body)
    if body.get("continue_final_message") is True:  # it leaves the last message open: no new turn
        body["add_generation_prompt"] = False
    if isinstance(body.get("chat_template_kwargs"), dict):
        body["chat_template_kwargs"] = {k: v for k, v in body["chat_template_kwargs"].items() if k not in RESERVED}
    if path == "/v1/responses":
        _response_rules(body)
        return
    if path not in GENERATION_PATHS:
        return
    if isinstance(body.get("messages"), list):
        body["messages"] = body["messages"][:MOST_MESSAGES]
        for message in body["messages"]:  # the template writes every call and part into the prompt too
            for field in ("tool_calls", "content"):
                if isinstance(message, dict) and isinstance(message.get(field), list):
                    message[field] = message[field][:MOST_MESSAGES]
    if isinstance(body.get("tools"), list):  # the template writes every tool into the prompt
        body["tools"] = [_small_tool(tool) for tool in body["tools"][:1]]
    if isinstance(body.get("prompt"), list) and body["prompt"] and not isinstance(body["prompt"][0], int):
        body["prompt"] = body["prompt"][:MOST_MESSAGES]
    for field in ("n", "best_of"):
        if isinstance(body.get(field), int | float) and not isinstance(body[field], bool):
            body[field] = min(body[field], MOST_MESSAGES)
    _name_a_declared_tool(body)
    _keep_one_constraint(body)
    _valid_patterns(body)


def _inside_the_model(value: Any, cut_texts: bool) -> Any:
    """Token ids below the smallest vocabulary and few of them, and short texts, however deep in lists or dicts."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value >= 0 and float(value).is_integer():  # JSON's 7.0 is an integer
        return type(value)(value % SMALLEST_VOCABULARY)
    if isinstance(value, str):
        return value[:MOST_CHARS] if cut_texts else value
    if isinstance(value, list):
        ids = value and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        return [_inside_the_model(v, cut_texts) for v in (value[:MOST_TOKENS * 4] if ids else value)]
    if isinstance(value, dict):
        return {k: _inside_the_model(v, cut_texts) for k, v in value.items()}
    return value


def _small_tool(tool: Any) -> Any:
    function = tool.get("function") if isinstance(tool, dict) else None
    if isinstance(function, dict) and len(json.dumps(function)) > MOST_CHARS:
        tool["function"] = {"name": function.get("name"), "parameters": {"type": "object"}}
    return tool


def _pair_texts(body: dict[str, Any]) -> None:
    first, second = body.get("text_1"), body.get("text_2")
    if isinstance(first, list) and isinstance(second, list) and 1 < len(second) != len(first) > 1:
        body["text_1"] = first[0]


def _valid_patterns(body: dict[str, Any]) -> None:
    for field, valid in VALID_TEXT.items():
        if isinstance(body.get(f"guided_{field}"), str):
            body[f"guided_{field}"] = valid
        outputs = body.get("structured_outputs")
        if isinstance(outputs, dict) and isinstance(outputs.get(field), str):
            outputs[field] = valid


def _response_rules(body: dict[str, Any]) -> None:
    """The Responses API's: few input items, one small tool, a named choice naming it, no format beside it, and
    no `previous_response_id` (an id the generator makes up names no stored response: a 400, as OpenAI answers)."""
    body.pop("previous_response_id", None)
    if isinstance(body.get("input"), list):  # and one that prompts: earlier reasoning alone is no prompt
        body["input"] = body["input"][:MOST_MESSAGES]
        if all(isinstance(item, dict) and item.get("type") == "reasoning" for item in body["input"]):
            body["input"] = "hi"
    tools = body.get("tools")
    if isinstance(tools, list):
        body["tools"] = [{"type": "function", "name": t.get("name"), "parameters": {"type": "object"}}
                         for t in tools[:1] if isinstance(t, dict)]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and body.get("tools"):
        body["tool_choice"] = {**choice, "name": body["tools"][0]["name"]}
    forced = choice == "required" or isinstance(choice, dict)
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if forced and isinstance(text, dict):
        body["text"] = {k: v for k, v in text.items() if k != "format"}
    elif isinstance(fmt, dict) and fmt.get("schema") is not None:  # small, as the tools' (numbers past 64 bits
        fmt["schema"] = {"type": "object"}  # in a made-up schema are what the grammar compiler refuses)


def _name_a_declared_tool(body: dict[str, Any]) -> None:
    choice, tools = body.get("tool_choice"), body.get("tools")
    names = [t["function"]["name"] for t in tools or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)
             and isinstance(t["function"].get("name"), str)] if isinstance(tools, list) else []
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict) and names:
        body["tool_choice"] = {**choice, "function": {**choice["function"], "name": names[0]}}


def _keep_one_constraint(body: dict[str, Any]) -> None:
    fmt = body.get("response_format")
    forced = body.get("tool_choice") == "required" or isinstance(body.get("tool_choice"), dict)
    kept = forced or (isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"))
    for field in GUIDED_FIELDS:
        if body.get(field) is not None:
            if kept:
                del body[field]
            kept = True
    if forced and isinstance(fmt, dict) and fmt.get("type") != "text":
        del body["response_format"]
