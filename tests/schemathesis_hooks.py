"""What schemathesis's generator must know beyond the OpenAPI document (schemathesis.toml loads this file).

JSON Schema cannot say that a named `tool_choice` names one of the request's own `tools`, nor that a text is a
regex in llguidance's syntax or a grammar; and the rule "one output constraint per request, none beside a forced
tool call", stated in the schema, made it too large for the generator to expand. A body that breaks only such a
rule is refused with a 400, so generated bodies name a tool they declare, get a valid pattern and grammar where
they set one, and keep one output constraint.
"""

from __future__ import annotations

from typing import Any

import schemathesis

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
CONSTRAINTS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
VALID_TEXT = {"regex": "[a-z]{1,4}", "grammar": 'start: "a" | "b"', "whitespace_pattern": " ?"}


@schemathesis.hook
def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    operation = context.operation
    if operation is None or operation.path not in GENERATION_PATHS or not isinstance(body, dict):
        return body
    _name_a_declared_tool(body)
    _keep_one_constraint(body)
    for field, valid in VALID_TEXT.items():
        if isinstance(body.get(f"guided_{field}"), str):
            body[f"guided_{field}"] = valid
        outputs = body.get("structured_outputs")
        if isinstance(outputs, dict) and isinstance(outputs.get(field), str):
            outputs[field] = valid
    return body


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
    for field in CONSTRAINTS:
        if body.get(field) is not None:
            if kept:
                del body[field]
            kept = True
    if forced and isinstance(fmt, dict) and fmt.get("type") != "text":
        del body["response_format"]
