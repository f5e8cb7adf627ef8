"""Reading a model's files: where a folder's ONNX file is, its pooling and length limits, and a tokenizer copy
for counting. Shared by the fastembed and the torch backends; nothing here imports either."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MAX_TOKENS_CAP = 512
ONNX_CANDIDATES = ("model.onnx", "onnx/model.onnx")

Pooling = Literal["mean", "cls", "last_token"]


def read_json(path: Path) -> dict[str, Any] | list[Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def find_onnx(folder: Path) -> str | None:
    """The ONNX file of a local model folder, relative to it, or None."""
    for rel in ONNX_CANDIDATES:
        if (folder / rel).is_file():
            return rel
    return None


def local_dir(name: str) -> Path | None:
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ValueError(f"{name!r} is not a model folder")
    return None


def fetch_file(name: str, local: Path | None, rel: str, cache_dir: str | None) -> Path | None:
    """A config file of a local folder, or of a hub repo (best effort, None when missing/unreachable)."""
    if local is not None:
        path = local / rel
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name, rel, cache_dir=cache_dir))
    except Exception:
        return None


def pooling_config(name: str, local: Path | None, cache_dir: str | None) -> dict[str, Any] | None:
    modules = fetch_file(name, local, "modules.json", cache_dir)
    pooling_dir = "1_Pooling"
    if modules is not None:
        for module in read_json(modules) or []:
            if isinstance(module, dict) and str(module.get("type", "")).endswith("models.Pooling"):
                pooling_dir = module.get("path") or pooling_dir
    cfg = fetch_file(name, local, f"{pooling_dir}/config.json", cache_dir)
    data = read_json(cfg) if cfg is not None else None
    return data if isinstance(data, dict) else None


def pooling_mode(name: str, local: Path | None, cache_dir: str | None) -> Pooling:
    """Pooling from sentence-transformers' Pooling config; mean when there is none."""
    cfg = pooling_config(name, local, cache_dir)
    if not cfg:
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_lasttoken"):
        return "last_token"
    enabled = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
    if enabled:
        raise ValueError(f"{name}: unsupported sentence-transformers pooling {enabled}")
    return "mean"


def valid_length(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= sys.maxsize:
        return None
    return value


def st_max_seq_length(name: str, local: Path | None, cache_dir: str | None) -> int | None:
    cfg = fetch_file(name, local, "sentence_bert_config.json", cache_dir)
    data = read_json(cfg) if cfg is not None else None
    return valid_length(data.get("max_seq_length")) if isinstance(data, dict) else None


def cap_tokens(*limits: int | None) -> int:
    return min([MAX_TOKENS_CAP, *[x for x in limits if x is not None]])


def counting_tokenizer(tok: Tokenizer) -> Tokenizer:
    """A copy of a ``tokenizers.Tokenizer`` with truncation and padding off, for counting."""
    from tokenizers import Tokenizer

    clone = Tokenizer.from_str(tok.to_str())
    clone.no_truncation()
    clone.no_padding()
    return clone


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
