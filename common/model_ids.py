"""Which model identifiers are acceptable: in a request's `model`, and as what a worker may load.

A model id becomes part of Redis key names, log lines and (for a worker) a `from_pretrained` argument, so it is
held to hub-id shapes: `[A-Za-z0-9._/-]`, no empty, `.` or `..` segments (no path traversal), and a leading `/`
(an absolute folder) only where ALLOW_MODEL_PATHS says so. MODEL_ALLOWLIST narrows what workers may load.
Shared by the API and the worker entry point, so it imports neither litestar nor torch.
"""

from __future__ import annotations

import fnmatch
import re

MAX_MODEL_ID_CHARS = 256
_SHAPE = re.compile("^[A-Za-z0-9._/-]+$")
_SEGMENT = r"(?!\.\.?(?:/|$))[A-Za-z0-9._-]+"  # not empty, '.' or '..'
#: The whole rule (bar absolute folders) as one regular expression, for the OpenAPI document.
MODEL_ID_PATTERN = f"^{_SEGMENT}(?:/{_SEGMENT})*$"


def model_id_problem(name: str, *, allow_paths: bool) -> str | None:
    """Why `name` is not an acceptable model id (one sentence), or None when it is."""
    if not name or len(name) > MAX_MODEL_ID_CHARS or not _SHAPE.fullmatch(name):
        return (f"A model id is 1 to {MAX_MODEL_ID_CHARS} characters of letters, digits, '.', '_', '-' and '/'.")
    segments = name.split("/")
    if name.startswith("/"):
        if not allow_paths:
            return "Absolute paths are not accepted as model ids here."
        segments = segments[1:]
    if any(seg in ("", ".", "..") for seg in segments):
        return "A model id may not contain empty, '.' or '..' path segments."
    return None


def allowed(name: str, patterns: list[str]) -> bool:
    """Whether MODEL_ALLOWLIST (shell-style patterns, `*` crossing `/`) admits `name`; an empty list admits all."""
    return not patterns or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def load_problem(name: str, *, allow_paths: bool, patterns: list[str]) -> str | None:
    """Why a worker must not load `name` (the shape rules plus the allow-list), or None."""
    problem = model_id_problem(name, allow_paths=allow_paths)
    if problem is None and not allowed(name, patterns):
        problem = "It is not on MODEL_ALLOWLIST."
    return problem
