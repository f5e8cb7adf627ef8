"""Every validation rule of issue #8 over real HTTP against `axion serve`: a 400 naming the field, 413 for big
bodies, 404 for unknown models, and the checks that must refuse before anything is queued."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from common import keys
from tests.conftest import REPO, Server

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(served: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base_url, timeout=60) as c:
        yield c


def chat(served: Server, **fields: object) -> dict[str, object]:
    return {"model": served.model, "messages": USER, "max_tokens": 2, **fields}


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in resp.text
    return error


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": 2.01}, "temperature"), ({"temperature": -0.1}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.01}, "top_p"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"), ({"n": 0}, "n"), ({"n": 129}, "n"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"), ({"max_tokens": 0}, "max_tokens"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"seed": 2**64}, "seed"), ({"temperature": "hot"}, "temperature"), ({"model": 7}, "model"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools"),
])
def test_out_of_range_fields_are_400s_naming_the_field(served: Server, http: httpx.Client, fields: dict,
                                                        param: str) -> None:
    assert error_of(http.post("/v1/chat/completions", json=chat(served, **fields)), 400)["param"] == param


@pytest.mark.parametrize(("body", "code"), [
    (b"{", "invalid_json"), (b"", "invalid_json"), (b"[1, 2]", None),
    (b'{"model": "m", "messages": [}', "invalid_json"),
    (b'{"model": "m", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "invalid_json"),
])
def test_malformed_json_is_a_400(http: httpx.Client, body: bytes, code: str | None) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/rerank", "/tokenize"):
        error = error_of(http.post(path, content=body, headers={"Content-Type": "application/json"}), 400)
        assert code is None or error["code"] == code


def test_oversized_body_is_a_413(http: httpx.Client) -> None:
    big = b'{"model": "m", "prompt": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    assert error_of(http.post("/v1/completions", content=big), 413)["code"] == "request_too_large"


def test_too_many_items_or_too_long_strings_are_400s(served: Server, http: httpx.Client) -> None:
    many = http.post("/v1/chat/completions", json=chat(served, messages=USER * 1025))
    assert error_of(many, 400)["param"] == "messages"
    long = http.post("/v1/chat/completions", json=chat(served, messages=[
        {"role": "system", "content": "ok"}, {"role": "user", "content": "x" * 1_000_001}]))
    assert error_of(long, 400)["param"] == "messages[1].content"
    inputs = http.post("/v1/embeddings", json={"model": served.model, "input": ["a"] * 2049})
    assert error_of(inputs, 400)["param"] == "input"
    documents = http.post("/rerank", json={"model": served.model, "query": "q", "documents": ["d"] * 2049})
    assert error_of(documents, 400)["param"] == "documents"


def _jobs_added(served: Server) -> int:
    url = re.search(r"embedded Redis at (redis://\S+)", served.procs[0].log())
    assert url, "axion serve did not log its Redis URL"
    r = redis.Redis.from_url(url.group(1))
    try:
        return int(r.xinfo_stream(keys.chat_stream(served.model))["entries-added"])
    finally:
        r.close()


def test_token_ids_outside_the_vocabulary_are_refused_before_queueing(served: Server, http: httpx.Client) -> None:
    before = _jobs_added(served)
    cases = [("/v1/completions", {"prompt": [1, 2, 10**6], "max_tokens": 1}, "prompt"),
             ("/v1/completions", {"prompt": [[1], [2, 10**6]], "max_tokens": 1}, "prompt[1]"),
             ("/v1/chat/completions", {"messages": USER, "stop_token_ids": [10**6]}, "stop_token_ids"),
             ("/v1/chat/completions", {"messages": USER, "logit_bias": {str(10**6): 1}}, "logit_bias"),
             ("/detokenize", {"tokens": [3, 10**6]}, "tokens")]
    for path, fields, param in cases:
        error = error_of(http.post(path, json={"model": served.model, **fields}), 400)
        assert error["param"] == param and "outside the vocabulary" in error["message"]
    assert _jobs_added(served) == before  # the API answered from the heartbeat's vocab_size
    assert http.post("/detokenize", json={"model": served.model, "tokens": [3, 4]}).status_code == 200


def test_edge_values_openai_accepts_are_served(served: Server, http: httpx.Client) -> None:
    for fields in ({"top_p": 0}, {"temperature": 1e-300}, {"temperature": 2, "top_p": 1},
                   {"presence_penalty": -2, "frequency_penalty": 2}, {"logprobs": True, "top_logprobs": 20},
                   {"n": 2, "stop": ["a", "b", "c", "d"]}):
        resp = http.post("/v1/chat/completions", json=chat(served, **fields))
        assert resp.status_code == 200, (fields, resp.text)


def test_model_ids_are_checked(served: Server, http: httpx.Client) -> None:
    for bad in ("../../etc/passwd", "models/../secret", "a b", "x" * 300, "org//name", "m\n"):
        error = error_of(http.post("/v1/chat/completions", json=chat(served, model=bad)), 400)
        assert error["param"] == "model"
    for unknown in ("no/such-model", "/no/such/folder"):
        error = error_of(http.post("/v1/chat/completions", json=chat(served, model=unknown)), 404)
        assert (error["code"], error["param"]) == ("model_not_found", "model")
    wrong_kind = http.post("/v1/embeddings", json={"model": served.model, "input": "hi"})
    assert error_of(wrong_kind, 400)["code"] == "model_not_supported"  # not a 503 the SDK would retry


def _worker(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "axion.cli", "worker"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **env})


@pytest.mark.parametrize(("env", "says"), [
    ({"MODEL_NAME": "models/../../secret"}, "'..'"),
    ({"MODEL_NAME": "/models/tiny", "ALLOW_MODEL_PATHS": "true", "MODEL_ALLOWLIST": "Qwen/*,/srv/*"},
     "MODEL_ALLOWLIST"),
    ({"WORKER_KIND": "embed", "EMBEDDING_MODEL": "evil/model", "MODEL_ALLOWLIST": "BAAI/*"}, "EMBEDDING_MODEL"),
    ({"MODEL_NAME": "Qwen/Qwen2.5-0.5B-Instruct", "SERVED_MODEL_NAME": "gpt 4"}, "SERVED_MODEL_NAME"),
])
def test_workers_load_only_allowed_models(tmp_path: Path, env: dict[str, str], says: str) -> None:
    done = _worker(tmp_path, **env)
    assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_an_operators_absolute_folder_is_accepted_without_allow_model_paths(tmp_path: Path) -> None:
    """Past the id checks (no ALLOW_MODEL_PATHS needed for a setting): the folder is missing, which it says."""
    done = _worker(tmp_path, MODEL_NAME="/models/tiny")
    assert done.returncode == 3 and "cannot load MODEL_NAME=/models/tiny" in done.stderr


def test_the_openapi_document_and_docs_page_are_where_vllm_serves_them(served: Server) -> None:
    schema = httpx.get(f"{served.base_url}/schema/openapi.json", timeout=10)
    same = httpx.get(f"{served.base_url}/openapi.json", timeout=10)
    assert same.status_code == 200 and same.json() == schema.json()
    assert "/v1/responses" in same.json()["paths"] and "/v1/batches" in same.json()["paths"]
    docs = httpx.get(f"{served.base_url}/docs", timeout=10, follow_redirects=True)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
