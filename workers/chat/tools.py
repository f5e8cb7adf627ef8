"""Tool calls: which format a model writes them in, how to read them from its output, how to force them.

Formats:
- `hermes` (Qwen 2/2.5/3, Hermes, most open chat models): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  possibly several, after optional text.
- `llama3` (Llama 3.1+): the whole reply is `{"name": ..., "parameters": {...}}`, optionally after
  `<|python_tag|>`; several calls are separated by `;`.

The format comes from the chat template (TOOL_CALL_FORMAT can override it). `tool_choice: required` and a named
function are enforced with a grammar (llguidance's Lark dialect with the tools' JSON schemas embedded), so the
call always parses and its arguments validate.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

from common.protocol import ToolCall

ToolFormat = Literal["hermes", "llama3"]
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES_BLOCK = re.compile(re.escape(HERMES_OPEN) + r"\s*(.*?)\s*" + re.escape(HERMES_CLOSE), re.DOTALL)


def detect_format(chat_template: str | None) -> ToolFormat:
    template = chat_template or ""
    if HERMES_OPEN in template:
        return "hermes"
    if PYTHON_TAG in template or "ipython" in template:
        return "llama3"
    return "hermes"


def markers(fmt: ToolFormat) -> list[str]:
    """Text from the first of these on is held back from the stream: it may be a tool call."""
    return [HERMES_OPEN] if fmt == "hermes" else [PYTHON_TAG]


def parse(text: str, fmt: ToolFormat) -> tuple[str, list[ToolCall]]:
    """(content before the calls, the calls). Malformed or cut-off calls are left as content."""
    if fmt == "hermes":
        start = text.find(HERMES_OPEN)
        if start < 0:
            return text, []
        calls = [c for c in (_call(block) for block in _HERMES_BLOCK.findall(text[start:])) if c is not None]
        return (text[:start].rstrip(), calls) if calls else (text, [])
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if not body.startswith("{"):
        return text, []
    parsed = [_call(part) for part in body.split(";") if part.strip()] if ";" in body else [_call(body)]
    if not parsed or any(c is None for c in parsed):
        return text, []
    return "", [c for c in parsed if c is not None]


def _call(raw: str) -> ToolCall | None:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=obj["name"], arguments=arguments)


def forcing_grammar(tools: list[dict[str, Any]], choice: str | dict[str, Any], parallel: bool,
                    fmt: ToolFormat) -> str | None:
    """A Lark grammar that admits only calls to the allowed tools with valid arguments; None when not forced.
    A name declared twice may be called with the arguments of either declaration."""
    functions = [t["function"] for t in tools if t.get("type", "function") == "function"]
    if isinstance(choice, dict):
        functions = [f for f in functions if f["name"] == choice.get("function", {}).get("name")]
    elif choice != "required":
        return None
    key = "arguments" if fmt == "hermes" else "parameters"
    variants = [{"type": "object", "additionalProperties": False, "required": ["name", key],
                 "properties": {"name": {"const": f["name"]},
                                key: f.get("parameters") or {"type": "object", "properties": {}}}}
                for f in functions]
    schema: dict[str, Any] = {"anyOf": variants} if len(variants) > 1 else variants[0]
    schema["x-guidance"] = {"whitespace_pattern": r"\x20?"}
    body = "%json " + json.dumps(schema)
    if fmt == "hermes":
        repeat = "+" if parallel and choice == "required" else ""  # a named function is called once
        return f'start: call{repeat}\ncall: "{HERMES_OPEN}" body "{HERMES_CLOSE}"\nbody: {body}\n'
    return f"start: {body}\n"
