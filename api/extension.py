"""Routes another package adds to the app (the Batch API, `batches/routes.py`), with what they add to the OpenAPI
document: the API never imports that package; the composition root (`axion/app.py`) hands them in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Extension:
    handlers: Sequence[Any]  # Litestar route handlers
    bodies: Mapping[str, type] = field(default_factory=dict)  # POST path -> the struct its JSON body decodes into
    uploads: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # POST path -> its multipart content
    page_limits: Mapping[str, int] = field(default_factory=dict)  # GET path -> the largest `limit` it takes
