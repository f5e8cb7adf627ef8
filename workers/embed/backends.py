"""Embedding and rerank backends: fastembed (onnxruntime) or torch/transformers.

``load_embedding`` / ``load_reranker`` take a hub id or a local folder and pick the backend:

* a local folder holding an ONNX model (``model.onnx`` or ``onnx/model.onnx``) loads through fastembed.
  The folder is registered with fastembed's ``add_custom_model`` under a name derived from its path
  (pooling read from sentence-transformers' ``1_Pooling/config.json``, default mean; normalisation on) and
  opened with ``specific_model_path``, so nothing is downloaded. fastembed needs ``tokenizer.json`` and
  ``tokenizer_config.json`` (with ``model_max_length``) next to the ONNX file;
* a local folder without ONNX loads through torch/transformers (``AutoModel`` + pooling per the
  sentence-transformers config; ``AutoModelForSequenceClassification`` with one logit for rerankers);
* a hub id that fastembed lists in ``list_supported_models()`` loads through fastembed (downloaded into
  ``cache_dir`` / ``FASTEMBED_CACHE_PATH``); any other hub id goes through torch's ``from_pretrained``.

The fastembed path does not import torch. ``device="cuda"`` (or ``"cuda:N"``) means the CUDA execution
provider for fastembed, and load fails at once when onnxruntime does not offer it; for torch the model is
moved to that device.

``max_tokens`` is the tokenizer's ``model_max_length``, lowered to sentence-transformers'
``max_seq_length`` where a ``sentence_bert_config.json`` gives one, and capped at 512. Both backends
truncate at exactly ``max_tokens``; ``count_tokens`` counts without truncation (special tokens included).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from workers.embed.fastembed_backend import FastEmbedEmbedding, FastEmbedReranker, fastembed_models, is_listed
from workers.embed.model_files import find_onnx, local_dir
from workers.embed.torch_backend import TorchEmbedding, TorchReranker


@runtime_checkable
class EmbeddingBackend(Protocol):
    model_id: str
    dim: int
    max_tokens: int
    backend: str  # "fastembed" | "torch"
    device: str  # as passed to load_*: "cpu", "cuda", "cuda:N"

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text has, special tokens included, before truncation."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Token ids back to text (ValueError for ids outside the vocabulary)."""
        ...

    def embed(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32, L2-normalised; texts are truncated at ``max_tokens``."""
        ...


@runtime_checkable
class RerankBackend(Protocol):
    model_id: str
    max_tokens: int
    backend: str  # "fastembed" | "torch"
    device: str  # as passed to load_*: "cpu", "cuda", "cuda:N"

    def count_tokens(self, pairs: list[tuple[str, str]]) -> list[int]:
        """Tokens each (query, document) pair has as one cross-encoder input, before truncation."""
        ...

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Raw relevance logits, one per (query, document) pair (the worker applies the sigmoid). The pairs of
        several requests go in one call."""
        ...


def load_embedding(name: str, *, device: str = "cpu", cache_dir: str | None = None) -> EmbeddingBackend:
    """Load an embedding model from a hub id or a local folder (see the module docstring for the rules)."""
    return _load("embed", name, device, cache_dir)


def load_reranker(name: str, *, device: str = "cpu", cache_dir: str | None = None) -> RerankBackend:
    """Load a cross-encoder from a hub id or a local folder (see the module docstring for the rules)."""
    return _load("rerank", name, device, cache_dir)


def _load(kind: Literal["embed", "rerank"], name: str, device: str, cache_dir: str | None) -> Any:
    fast, slow = (FastEmbedEmbedding, TorchEmbedding) if kind == "embed" else (FastEmbedReranker, TorchReranker)
    local = local_dir(name)
    if local is not None:
        use_fastembed = find_onnx(local) is not None
    else:
        use_fastembed = is_listed(name, fastembed_models(kind))
    return (fast if use_fastembed else slow)(name, local=local, device=device, cache_dir=cache_dir)
