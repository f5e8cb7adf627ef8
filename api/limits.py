"""Size limits and token-id checks on a request body, applied before the endpoint decodes it or queues work.

These hold for every endpoint at once, on the body as plain JSON: too many messages (MAX_MESSAGES), inputs or
documents (MAX_INPUTS), any string longer than MAX_STRING_CHARS, or a token id outside the model's vocabulary
(as its workers announce it in their heartbeat) is a 400 naming the field. The endpoints' own typed checks
(ranges, roles, shapes) come after, in `api/protocol.py` and friends.
"""

from __future__ import annotations

from typing import Any

from api.endpoints import endpoint
from api.errors import APIError
from common.protocol import MAX_SCHEMA_NODES, json_nodes, prompt_too_long, text_chars
from common.settings import Settings


def check_sizes(body: dict[str, Any], settings: Settings) -> None:
    """400 for too many items in the list fields, or for any string longer than MAX_STRING_CHARS."""
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > settings.max_messages:
        raise APIError(400, f"'messages' holds {len(messages)} messages; at most {settings.max_messages} are "
                       "accepted.", param="messages", code="invalid_value")
    for field in ("input", "documents", "prompt", "text_1", "text_2"):
        items = body.get(field)
        is_token_ids = isinstance(items, list) and all(isinstance(x, int) for x in items)
        if isinstance(items, list) and not is_token_ids and len(items) > settings.max_inputs:
            raise APIError(400, f"'{field}' holds {len(items)} items; at most {settings.max_inputs} are accepted.",
                           param=field, code="invalid_value")
    where = _long_string(body, settings.max_string_chars)
    if where is not None:
        raise APIError(400, f"'{where}' is longer than {settings.max_string_chars} characters.", param=where,
                       code="string_above_max_length")


def check_prompt_length(path: str, body: dict[str, Any], max_seq_len: int) -> None:
    """400 context_length_exceeded for a prompt that cannot fit MAX_SEQ_LEN: more token ids than that, or more
    characters than any tokenizer could pack into it (`prompt_too_long`). Exact counts are the worker's."""
    served = endpoint(path)
    for field in served.prompt_fields if served is not None else ():
        for index, prompt in _prompts(body.get(field), field):
            if field == "prompt" and isinstance(prompt, list):  # token ids
                problem = (f"This model's maximum context length is {max_seq_len} tokens; the prompt's "
                           f"{len(prompt)} tokens cannot fit in it.") if len(prompt) > max_seq_len else None
            else:
                problem = prompt_too_long(_prompt_chars(prompt), max_seq_len)
            if problem:
                param = field if index is None else f"{field}[{index}]"
                raise APIError(400, problem, param=param, code="context_length_exceeded")


def _prompts(value: Any, field: str) -> list[tuple[int | None, Any]]:
    """(index or None, prompt) for each prompt in a `messages` or `prompt` field: a legacy `prompt` may be a
    list of texts or of token-id lists, each a prompt of its own."""
    if value is None:
        return []
    if field == "prompt" and isinstance(value, list) and value and all(isinstance(x, str | list) for x in value):
        return [(i, x) for i, x in enumerate(value)]
    return [(None, value)]


def _prompt_chars(prompt: Any) -> int:
    """Characters of a text prompt, or of the messages' contents (string or text parts)."""
    if not isinstance(prompt, list):
        return text_chars(prompt)
    total = 0
    for message in prompt:
        content = message.get("content") if isinstance(message, dict) else None
        parts = content if isinstance(content, list) else [content]
        total += sum(text_chars(part.get("text") if isinstance(part, dict) else part) for part in parts)
    return total


def check_schema_sizes(body: dict[str, Any]) -> None:
    """400 for tool or response schemas larger than MAX_SCHEMA_NODES JSON values in all (they are compiled into
    a grammar on the worker, at a cost that grows with them)."""
    for field in ("tools", "response_format"):
        value = body.get(field)
        nodes = json_nodes(value) if isinstance(value, list | dict) else 0
        if nodes > MAX_SCHEMA_NODES:
            raise APIError(400, f"'{field}' holds {nodes} JSON values; at most {MAX_SCHEMA_NODES} are accepted.",
                           param=field, code="invalid_schema")


def _long_string(body: Any, limit: int) -> str | None:
    """The path (`messages[2].content`) of the first string (value or key) longer than `limit`, or None."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if len(value) > limit:
                return _path(path)
        elif isinstance(value, dict):
            for key, item in value.items():
                if len(key) > limit:
                    return _path(path) or "body"
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(value))
    return None


def _path(parts: tuple[str | int, ...]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def token_id_fields(path: str, body: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """(param, ids) for every field of this endpoint's body that carries token ids."""
    found: list[tuple[str, list[Any]]] = []
    served = endpoint(path)
    if served is None:
        return found
    if served.sampling:
        if isinstance(body.get("stop_token_ids"), list):
            found.append(("stop_token_ids", body["stop_token_ids"]))
        if isinstance(body.get("logit_bias"), dict):
            ids = [int(k) for k in body["logit_bias"] if isinstance(k, str) and k.isascii() and k.isdigit()
                   and len(k) < 20]
            found.append(("logit_bias", ids))
    field = served.id_field
    value = body.get(field) if field else None
    if field and isinstance(value, list):
        if all(isinstance(x, int) for x in value):
            found.append((field, value))
        else:
            found.extend((f"{field}[{i}]", x) for i, x in enumerate(value) if isinstance(x, list))
    return found


def check_vocabulary(path: str, body: dict[str, Any], vocab_size: int) -> None:
    """400 for a token id at or above vocab_size in any token-id field (negative ones are the typed decoders'
    to name, element by element)."""
    for param, ids in token_id_fields(path, body):
        bad = next((i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= vocab_size), None)
        if bad is not None:
            raise APIError(400, f"Token id {bad} in '{param}' is outside the vocabulary (0..{vocab_size - 1}).",
                           param=param, code="invalid_value")
