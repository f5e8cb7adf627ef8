"""What schemathesis's generator must know beyond the OpenAPI document (schemathesis.toml loads this file).

JSON Schema cannot say that a named `tool_choice` names one of the request's own `tools`; a body that breaks only
that rule is refused with a 400 as at OpenAI, so generated bodies are pointed at a tool they declare.
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    operation = context.operation
    if operation is None or operation.path != "/v1/chat/completions" or not isinstance(body, dict):
        return body
    choice, tools = body.get("tool_choice"), body.get("tools")
    names = [t["function"]["name"] for t in tools or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)
             and isinstance(t["function"].get("name"), str)] if isinstance(tools, list) else []
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict) and names:
        body["tool_choice"] = {**choice, "function": {**choice["function"], "name": names[0]}}
    return body
