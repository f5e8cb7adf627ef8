"""Embeddings and rerank through `axion serve`: real all-MiniLM-L6-v2 weights (exported to ONNX, served by
fastembed), a random cross-encoder (ONNX through fastembed), checked against the torch backend."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from common import VERSION
from common.redis_server import free_port
from devtools.embed_models import build_tiny_cross_encoder, minilm_dir
from tests.conftest import Proc, Server, axion_env, get_json, wait_ready
from workers.embed.backends import load_embedding

SENTENCES = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today.",
             "Cats sleep most of the day.", "A kitten naps on the sofa."]


@pytest.fixture(scope="module")
def models(minilm_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return minilm_onnx, build_tiny_cross_encoder(tmp_path_factory.mktemp("embed-models") / "cross-encoder")


@pytest.fixture(scope="module")
def embedding_server(tiny_model_dir: Path, models: tuple[Path, Path],
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    env = axion_env(tiny_model_dir, None, port, EMBEDDING_MODEL=str(models[0]), RERANK_MODEL=str(models[1]),
                    MODEL_ALIASES=f"reranker={models[1]}")
    proc = Proc(["serve"], env, tmp_path_factory.mktemp("embed-logs") / "serve.log").start()
    server = Server(f"http://127.0.0.1:{port}", str(models[0]), [proc])
    try:
        wait_ready(server.base_url, [proc], workers=3)
        yield server
    finally:
        proc.stop()


def cosine(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embeddings_equal_the_torch_backend_and_keep_meaning(embedding_server: Server) -> None:
    client = embedding_server.client()
    floats = client.embeddings.create(model=embedding_server.model, input=SENTENCES, encoding_format="float")
    default = client.embeddings.create(model=embedding_server.model, input=SENTENCES)  # the SDK asks for base64
    reference = load_embedding(str(minilm_dir())).embed(SENTENCES)
    assert [d.index for d in floats.data] == list(range(5)) and len(floats.data[0].embedding) == 384
    for got, via_base64, want in zip(floats.data, default.data, reference, strict=True):
        assert cosine(got.embedding, want) >= 0.9999
        assert np.allclose(got.embedding, via_base64.embedding, atol=1e-7)
    vectors = [d.embedding for d in floats.data]
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert cosine(vectors[3], vectors[4]) > cosine(vectors[3], vectors[2])
    assert floats.usage.prompt_tokens == sum(load_embedding(str(minilm_dir())).count_tokens(SENTENCES))


def test_base64_is_little_endian_float32(embedding_server: Server) -> None:
    body = {"model": embedding_server.model, "input": "hello", "encoding_format": "base64"}
    raw = base64.b64decode(httpx.post(f"{embedding_server.base_url}/v1/embeddings", json=body,
                                      timeout=30).json()["data"][0]["embedding"])
    vector = struct.unpack("<384f", raw)
    assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-5)


def test_dimensions_truncate_and_renormalise(embedding_server: Server) -> None:
    client = embedding_server.client()
    short = client.embeddings.create(model=embedding_server.model, input=SENTENCES[0], dimensions=64,
                                     encoding_format="float").data[0].embedding
    full = client.embeddings.create(model=embedding_server.model, input=SENTENCES[0],
                                    encoding_format="float").data[0].embedding
    assert len(short) == 64 and math.isclose(float(np.linalg.norm(short)), 1.0, rel_tol=1e-5)
    assert cosine(short, full[:64]) > 0.99999
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=embedding_server.model, input="x", dimensions=385)
    assert info.value.body["param"] == "dimensions"


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input[0]"), ({"input": []}, "input"), ({"input": ["ok"] * 2049}, "input"),
    ({"input": [[1, 2], "x"]}, "input"), ({"input": [[]]}, "input"), ({"input": [99_999_999]}, "input"),
    ({"input": "word " * 400}, "input[0]"), ({"input": 5}, "input"),
])
def test_bad_embedding_inputs(embedding_server: Server, body: dict, param: str) -> None:
    resp = httpx.post(f"{embedding_server.base_url}/v1/embeddings", json={"model": embedding_server.model, **body},
                      timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_long_input_with_truncate(embedding_server: Server) -> None:
    body = {"model": embedding_server.model, "input": "word " * 400, "truncate": True}
    resp = httpx.post(f"{embedding_server.base_url}/v1/embeddings", json=body, timeout=30)
    assert resp.status_code == 200 and resp.json()["usage"]["prompt_tokens"] == 256


def test_concurrent_clients_share_model_calls(embedding_server: Server) -> None:
    """32 clients × 1 sentence: every answer right, and far fewer model calls than requests."""
    time.sleep(4)  # the heartbeat (every HEARTBEAT_TTL_S / 3) must include the earlier tests' calls
    worker_before = _embed_worker(embedding_server)
    texts = [f"Sentence number {i} about ships and stars." for i in range(32)]

    async def all_of_them() -> list:
        client = embedding_server.async_client()
        return await asyncio.gather(*(client.embeddings.create(model=embedding_server.model, input=t,
                                                               encoding_format="float") for t in texts))

    results = asyncio.run(all_of_them())
    reference = load_embedding(str(minilm_dir())).embed(texts)
    for result, want in zip(results, reference, strict=True):
        assert cosine(result.data[0].embedding, want) >= 0.9999
    time.sleep(4)  # a heartbeat later, the counters are current
    worker_after = _embed_worker(embedding_server)
    calls = worker_after["decode_steps"] - worker_before["decode_steps"]
    assert calls < 16, f"{calls} model calls for 32 requests"


def _embed_worker(server: Server) -> dict:
    import msgspec
    import redis

    from common import keys
    from common.protocol import decode_worker

    health = get_json(f"{server.base_url}/health")
    (worker,) = [w for w in health["workers"] if w["kind"] == "embed"]
    r = redis.Redis.from_url(_redis_url(server))
    return msgspec.structs.asdict(decode_worker(r.get(keys.worker_heartbeat(worker["id"]))))


def _redis_url(server: Server) -> str:
    log = server.procs[0].log()
    return log.split("started an embedded Redis at ", 1)[1].split(" ", 1)[0]


def test_rerank_scores_equal_torch_sigmoid(embedding_server: Server, models: tuple[Path, Path]) -> None:
    query, docs = "what is the weather", ["sunny and warm", "stocks fell", "rain later", "a cat", "cloudy skies"]
    logits = _torch_scores(models[1], query, docs)  # plain transformers, not our backends
    expected = [1 / (1 + math.exp(-x)) for x in logits]
    for path in ("/v1/rerank", "/rerank"):
        body = {"model": str(models[1]), "query": query, "documents": [docs[0], {"text": docs[1]}, *docs[2:]],
                "top_n": 3, "return_documents": True}
        resp = httpx.post(f"{embedding_server.base_url}{path}", json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        results = resp.json()["results"]
        assert len(results) == 3
        assert [r["index"] for r in results] == sorted(range(5), key=lambda i: expected[i], reverse=True)[:3]
        for r in results:
            assert abs(r["relevance_score"] - expected[r["index"]]) < 1e-4 and 0 <= r["relevance_score"] <= 1
            assert r["document"]["text"] == docs[r["index"]]


def test_rerank_returns_documents_unless_told_not_to_and_serves_cohere_v2(embedding_server: Server,
                                                                          models: tuple[Path, Path]) -> None:
    url, docs = embedding_server.base_url, ["sunny and warm", "stocks fell", "rain later"]
    body = {"model": str(models[1]), "query": "weather", "documents": docs}
    plain = httpx.post(f"{url}/v1/rerank", json=body, timeout=30).json()["results"]
    assert all(r["document"]["text"] == docs[r["index"]] for r in plain)  # as vLLM: documents unless told
    bare = httpx.post(f"{url}/v1/rerank", json=body | {"return_documents": False}, timeout=30).json()["results"]
    assert all("document" not in r for r in bare) and [r["index"] for r in bare] == [r["index"] for r in plain]
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # offline: no cost-map download on import
    import litellm  # its cohere/ provider calls Cohere's /v2/rerank, as a user of litellm would

    answer = litellm.rerank(model="cohere/reranker", query="weather", documents=docs, top_n=2, api_base=url,
                            api_key="unused")
    assert [r["index"] for r in answer.results] == [r["index"] for r in plain][:2]
    assert [r["relevance_score"] for r in answer.results] == pytest.approx([r["relevance_score"] for r in plain][:2])


def test_vllm_score_api_pairs_texts_like_rerank(embedding_server: Server, models: tuple[Path, Path]) -> None:
    url, docs = embedding_server.base_url, ["sunny and warm", "stocks fell", "rain later"]
    ranked = httpx.post(f"{url}/rerank", json={"model": "reranker", "query": "weather", "documents": docs},
                        timeout=30).json()["results"]
    by_index = {r["index"]: r["relevance_score"] for r in ranked}
    one_to_many = httpx.post(f"{url}/score", json={"model": "reranker", "text_1": "weather", "text_2": docs},
                             timeout=30).json()
    assert one_to_many["object"] == "list" and one_to_many["usage"]["prompt_tokens"] > 0
    assert [d["score"] for d in one_to_many["data"]] == pytest.approx([by_index[i] for i in range(3)])
    pairs = httpx.post(f"{url}/v1/score", json={"model": "reranker", "text_1": ["weather", "money", "weather"],
                                                "text_2": docs}, timeout=30).json()
    assert [d["index"] for d in pairs["data"]] == [0, 1, 2] and pairs["data"][0]["score"] == pytest.approx(by_index[0])
    bad = httpx.post(f"{url}/score", json={"model": "reranker", "text_1": ["a", "b"], "text_2": ["x", "y", "z"]},
                     timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text_1"


def test_requests_without_a_model_go_to_the_one_served(embedding_server: Server) -> None:
    """As vLLM serves its only model: here one chat, one embedding and one rerank model."""
    url = embedding_server.base_url
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 3}, timeout=60)
    assert chat.status_code == 200, chat.text
    embedded = httpx.post(f"{url}/v1/embeddings", json={"input": "hello"}, timeout=30)
    assert embedded.status_code == 200 and len(embedded.json()["data"][0]["embedding"]) == 384
    scored = httpx.post(f"{url}/v2/rerank", json={"query": "q", "documents": ["a", "b"]}, timeout=30)
    assert scored.status_code == 200 and len(scored.json()["results"]) == 2
    assert httpx.get(f"{url}/version", timeout=5).json() == {"version": VERSION}


def _torch_scores(folder: Path, query: str, docs: list[str]) -> list[float]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        enc = tok([query] * len(docs), docs, return_tensors="pt", padding=True, truncation=True)
        return model(**enc).logits[:, 0].tolist()


@pytest.mark.parametrize(("body", "param"), [
    ({"query": "", "documents": ["a"]}, "query"), ({"query": "q", "documents": []}, "documents"),
    ({"query": "q", "documents": ["a", ""]}, "documents[1]"),
])
def test_bad_rerank_requests(embedding_server: Server, models: tuple[Path, Path], body: dict, param: str) -> None:
    resp = httpx.post(f"{embedding_server.base_url}/v1/rerank", json={"model": str(models[1]), **body}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param


def test_token_id_inputs(embedding_server: Server) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    ids = [tok(s)["input_ids"] for s in SENTENCES[:2]]
    client = embedding_server.client()
    by_text = client.embeddings.create(model=embedding_server.model, input=SENTENCES[:2], encoding_format="float")
    by_ids = client.embeddings.create(model=embedding_server.model, input=ids, encoding_format="float")
    one = client.embeddings.create(model=embedding_server.model, input=ids[0], encoding_format="float")
    assert len(by_ids.data) == 2 and len(one.data) == 1
    for a, b in zip(by_text.data, by_ids.data, strict=True):
        assert cosine(a.embedding, b.embedding) >= 0.9999
    assert cosine(one.data[0].embedding, by_text.data[0].embedding) >= 0.9999
