"""Fields Axion does not serve: accepted only at their neutral values, else a 400 naming them, so a client never
gets an answer that ignored what it asked for. OpenAI's (chat only) and vLLM's extras (chat and completions)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from api.errors import APIError
from api.guided import GuidedFields

#: OpenAI chat fields not served, with the values that change nothing (and vLLM's `add_special_tokens`, which in
#: chat would add the special tokens the template already writes).
CHAT_UNSERVED: dict[str, tuple[Any, ...]] = {
    "functions": (None, []), "function_call": (None, "none"),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "add_special_tokens": (None, False),
}

#: vLLM's request extras not served, with their defaults (what they mean when unset).
VLLM_UNSERVED: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (None, False), "length_penalty": (None, 1.0), "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,), "allowed_token_ids": (None,),
    "bad_words": (None, []), "return_tokens_as_token_ids": (None, False), "return_token_ids": (None, False),
    "chat_template": (None,), "documents": (None,), "mm_processor_kwargs": (None,), "logits_processors": (None,),
    "priority": (None, 0), "vllm_xargs": (None,),
}


class VllmFields(GuidedFields, kw_only=True):
    """vLLM's extras beside its constraints, as chat and legacy completions take them (`extra_body`)."""

    use_beam_search: Any = None
    length_penalty: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    spaces_between_special_tokens: Any = None
    truncate_prompt_tokens: Any = None
    prompt_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None  # served: the prompt's logprobs too
    allowed_token_ids: Any = None
    bad_words: Any = None
    return_tokens_as_token_ids: Any = None
    return_token_ids: Any = None
    chat_template: Any = None
    documents: Any = None
    mm_processor_kwargs: Any = None
    logits_processors: Any = None
    priority: Any = None
    vllm_xargs: Any = None


def refuse_unserved(req: Any, table: dict[str, tuple[Any, ...]]) -> None:
    """400 for the first field of `table` set to anything but one of its neutral values."""
    for name, neutral in table.items():
        value = getattr(req, name)
        if not any(_same(value, v) for v in neutral):
            raise APIError(400, f"'{name}' is not supported by this server.", param=name,
                           code="unsupported_parameter")


def _same(value: Any, neutral: Any) -> bool:
    """Equal and of one JSON type: JSON's 1 and 1.0 are one number, but `true` is not 1 nor `[]` null."""
    numbers = (int, float)
    return value == neutral and (type(value) is type(neutral) or (type(value) in numbers and type(neutral) in numbers))
