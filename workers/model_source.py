"""Before a worker loads its model: can it? A local folder, a model already in the local caches, or a reachable model
hub. When none holds, the worker says so in one line, with the command that works offline, instead of retrying
the hub for a minute and ending in tracebacks."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

OFFLINE_COMMANDS = {
    "chat": ("MODEL_NAME", "axion dev tiny-model models/tiny && MODEL_NAME=models/tiny axion serve"),
    "embed": ("EMBEDDING_MODEL", "axion dev embed-model models/minilm, then EMBEDDING_MODEL=models/minilm"),
    "rerank": ("RERANK_MODEL", "axion dev rerank-model models/rerank, then RERANK_MODEL=models/rerank"),
}
PROBE_TIMEOUT_S = 3.0


def _cached(name: str, fastembed_cache: str | None) -> bool:
    """In the Hugging Face cache (transformers, vLLM) or in fastembed's (its folders carry the model's name)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return True
    except ValueError:  # not a hub id (huggingface_hub's HFValidationError)
        pass
    folder = Path(fastembed_cache or Path(tempfile.gettempdir()) / "fastembed_cache")
    short = name.rsplit("/", 1)[-1].lower()
    return folder.is_dir() and any(short in child.name.lower() for child in folder.iterdir())


def _hub_unreachable() -> str | None:
    """Why the model hub cannot be used now (HF_HUB_OFFLINE, or no connection within a few seconds), else None."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"the model hub ({host}) cannot be reached: {exc.strerror or exc}"
    return None


def unavailable(kind: str, name: str, fastembed_cache: str | None = None) -> str | None:
    """One line saying why the worker of `kind` cannot load `name` and what works offline; None when it may try."""
    if Path(name).exists():
        return None
    variable, command = OFFLINE_COMMANDS[kind]
    if name.startswith(("/", "./", "../")):
        return f"cannot load {variable}={name}: no such folder. To build one locally: {command}"
    if _cached(name, fastembed_cache):
        return None
    why = _hub_unreachable()
    if why is None:
        return None
    return (f"cannot load {variable}={name}: it is not a local folder nor in the local model cache, and {why}. "
            f"Offline, build one locally: {command}")
