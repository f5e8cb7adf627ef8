"""Model aliases (MODEL_ALIASES): a request may name `gpt-4o-mini` and be served by a local model.

The guard (`api/guard.py`) resolves the alias in the request body before anything else looks at `model`, so
permission checks, rate limits, the response caches, the registry and the job stream all see the served model
id only: an alias and its target share cache entries and queues. The name the client sent is kept for the
request's duration in a context variable, and every response's `model` field echoes it (`shown`): clients that
compare the answer's model with the one they asked for (and SDK wrappers that key usage by it) keep working,
as with vLLM's several served-model names.
"""

from __future__ import annotations

import functools
from contextvars import ContextVar

from common.settings import parse_aliases

#: (served model id, name the client sent) of the request being served, when it came in under an alias.
requested: ContextVar[tuple[str, str] | None] = ContextVar("axion_requested_model", default=None)


@functools.lru_cache(maxsize=8)
def table(setting: str) -> dict[str, str]:
    """MODEL_ALIASES parsed once per distinct value (load_settings has validated it already)."""
    return parse_aliases(setting)


def resolve(setting: str, model: str) -> str:
    """The served model id that `model` names (itself when it is no alias)."""
    return table(setting).get(model, model)


def shown(model: str) -> str:
    """The name to put in a response's `model` field for the served model `model`."""
    alias = requested.get()
    return alias[1] if alias is not None and alias[0] == model else model


def aliases_of(setting: str, model: str) -> list[str]:
    """Every alias that points at `model`, sorted (listed by /v1/models next to the model)."""
    return sorted(alias for alias, target in table(setting).items() if target == model)
