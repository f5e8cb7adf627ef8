"""vLLM's chat-template options, for chat completions and /tokenize: whether the template opens the assistant's
turn, continues the last message instead, and which extra variables it gets (`enable_thinking`, ...)."""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from api.errors import APIError

#: Names `apply_chat_template` takes for itself: a template variable of these names would change the call.
RESERVED = frozenset({"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                      "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                      "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "messages"})


class TemplateOptions(Protocol):
    add_generation_prompt: bool | None
    continue_final_message: bool
    chat_template_kwargs: dict[str, Any] | None


class TemplateFields(msgspec.Struct, kw_only=True):
    """The options as /tokenize takes them (chat completions declares the same three)."""

    add_generation_prompt: bool | None = None
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


def template_options(req: TemplateOptions) -> dict[str, Any]:
    """The job fields the options set: continuing the last message opens no turn (unless `add_generation_prompt`
    says true: a 400), and a template variable may not be one of `apply_chat_template`'s own arguments."""
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(400, "'continue_final_message' continues the last message: set 'add_generation_prompt' to "
                            "false with it.", param="continue_final_message", code="invalid_value")
    clash = sorted(RESERVED & set(req.chat_template_kwargs or {}))
    if clash:
        raise APIError(400, f"'chat_template_kwargs' may not set '{clash[0]}' (an argument of the template call).",
                       param=f"chat_template_kwargs.{clash[0]}", code="invalid_value")
    return {"add_generation_prompt": not req.continue_final_message and req.add_generation_prompt is not False,
            "continue_final_message": req.continue_final_message,
            "chat_template_kwargs": dict(req.chat_template_kwargs) if req.chat_template_kwargs else None}
