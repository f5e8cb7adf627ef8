"""The two backends agree: fastembed (ONNX) and torch/transformers on the same weights, for both kinds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from devtools.embed_models import build_tiny_cross_encoder, export_minilm_onnx, minilm_dir
from workers.embed.backends import load_embedding, load_reranker


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same random cross-encoder twice: with its ONNX file (fastembed) and without it (torch)."""
    root = tmp_path_factory.mktemp("cross")
    onnx = build_tiny_cross_encoder(root / "with-onnx")
    torch_only = root / "torch-only"
    shutil.copytree(onnx, torch_only, ignore=shutil.ignore_patterns("*.onnx", "onnx"))
    return onnx, torch_only


def test_reranker_backends_agree(cross_encoder: tuple[Path, Path]) -> None:
    fast, slow = load_reranker(str(cross_encoder[0])), load_reranker(str(cross_encoder[1]))
    assert (fast.backend, slow.backend) == ("fastembed", "torch")
    docs = ["sunny and warm", "stocks fell", "rain later today", "a cat"]
    pairs = [("weather?", d) for d in docs]
    assert np.allclose(fast.score(pairs), slow.score(pairs), atol=1e-4)
    assert fast.count_tokens(pairs) == slow.count_tokens(pairs)


def test_embedding_backends_agree(tmp_path: Path) -> None:
    fast, slow = load_embedding(str(export_minilm_onnx(tmp_path / "minilm"))), load_embedding(str(minilm_dir()))
    assert (fast.backend, slow.backend) == ("fastembed", "torch") and fast.dim == slow.dim == 384
    texts = ["A man is playing a guitar.", "word " * 300]
    a, b = fast.embed(texts), slow.embed(texts)
    assert np.all(np.sum(a * b, axis=1) >= 0.9999)
    assert fast.count_tokens(texts) == slow.count_tokens(texts) and fast.max_tokens == slow.max_tokens == 256
    assert fast.decode(slow._tok("hello world")["input_ids"]) == "hello world"
