"""A loaded model's revision: the response cache keys on it, so a new model version never serves old answers."""

from __future__ import annotations

import hashlib
from pathlib import Path

MAX_FILES = 10_000


def model_revision(name: str, commit_hash: str | None = None) -> str:
    """For a local folder, a fingerprint of its files (relative path, size, modification time): replacing the
    weights, the tokenizer or the chat template changes it without reading gigabytes. For a hub id, the commit
    of the snapshot that was loaded (transformers records it as `config._commit_hash`)."""
    folder = Path(name).expanduser()
    if folder.is_file():  # a .gguf MODEL_NAME: the file is the whole model
        stat = folder.stat()
        return "file-" + hashlib.sha256(f"{folder.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    if folder.is_dir():
        digest = hashlib.sha256()
        files = sorted(p for p in folder.rglob("*") if p.is_file() and ".git" not in p.parts)[:MAX_FILES]
        for path in files:
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return "dir-" + digest.hexdigest()[:16]
    return commit_hash or "unknown"


def load_variant(gguf_file: str | None, quantization: str) -> str:
    """What to append to a revision when the same folder is loaded differently: a GGUF file instead of its
    safetensors, or quantized weights give other answers, which must never share cached responses."""
    return (f"+gguf:{gguf_file}" if gguf_file else "") + (f"+{quantization}" if quantization != "none" else "")
