"""The bodies of the hot-swap endpoints (`api/admin.py`): `POST /admin/models/load` and `/admin/models/unload`."""

from __future__ import annotations

from typing import Literal

import msgspec


class LoadRequest(msgspec.Struct, kw_only=True):
    model: str
    worker: str | None = None
    kind: Literal["chat", "embed", "rerank"] | None = None
    served_name: str | None = None


class UnloadRequest(msgspec.Struct, kw_only=True):
    model: str
    worker: str | None = None
