"""The Batch API end to end: `axion serve` on the test Redis (API, chat, embedding and rerank workers, and the rq
batch worker as its children), driven by the official `openai` SDK's files and batches calls."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import redis

from common import keys
from common.redis_server import EmbeddedRedis, free_port
from tests.conftest import Proc, Server, axion_env, wait_ready
from workers.embed.backends import load_embedding

TERMINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def batch_server(tiny_model_dir: Path, minilm_onnx: Path, redis_server: EmbeddedRedis,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Fleet mode on the test Redis: an API, a chat and an embedding worker, and `axion batch-worker` (rq)."""
    port = free_port()
    logs = tmp_path_factory.mktemp("batch-logs")
    env = axion_env(tiny_model_dir, redis_server.url, port, MAX_SEQ_LEN="1024", MAX_BATCH_SIZE="8",
                    EMBEDDING_MODEL=str(minilm_onnx))
    procs = [Proc(["api"], env, logs / "api.log"), Proc(["worker"], env | {"WORKER_KIND": "chat"}, logs / "chat.log"),
             Proc(["worker"], env | {"WORKER_KIND": "embed"}, logs / "embed.log"),
             Proc(["batch-worker"], env, logs / "batch-worker.log")]
    server = Server(f"http://127.0.0.1:{port}", str(tiny_model_dir), [p.start() for p in procs],
                    redis_url=redis_server.url)
    try:
        wait_ready(server.base_url, procs, workers=2)
        yield server
    finally:
        for proc in procs:
            proc.stop()


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_line(custom_id: str, model: str, prompt: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 4}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body | extra}


def submit(client: openai.OpenAI, lines: list[dict[str, Any]], endpoint: str = "/v1/chat/completions") -> Any:
    upload = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes == len(jsonl(lines))
    return client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]


def wait_done(client: openai.OpenAI, batch_id: str, timeout: float = 120) -> tuple[Any, list[Any]]:
    """Poll until the batch is final; returns it and every state seen on the way."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        seen.append(batch)
        if batch.status in TERMINAL:
            return batch, seen
        time.sleep(0.1)
    pytest.fail(f"batch {batch_id} not done within {timeout}s: {seen[-1]}")


def read_file(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    rows = [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    return {row["custom_id"]: row for row in rows}


def test_chat_batch_matches_online_answers_and_reuses_the_cache(batch_server: Server) -> None:
    client, model = batch_server.client(), batch_server.model
    prompts = [f"Tell me about item {i % 150}" for i in range(200)]  # 50 lines repeat an earlier request
    lines = [chat_line(f"req-{i}", model, p) for i, p in enumerate(prompts)]
    r = redis.Redis.from_url(batch_server.redis_url)
    hits_before = int(r.hget(keys.cache_stats("chat"), "hits") or 0)
    started = time.monotonic()
    batch = submit(client, lines)
    assert batch.status == "validating" and batch.endpoint == "/v1/chat/completions"
    batch, seen = wait_done(client, batch.id)
    print(f"200-line chat batch: {time.monotonic() - started:.1f}s")
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 200 and batch.request_counts.completed == 200
    assert batch.request_counts.failed == 0 and batch.error_file_id is None
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert any(b.status == "in_progress" and 0 < b.request_counts.completed < 200 for b in seen), \
        "request_counts did not move while the batch ran"
    assert int(r.hget(keys.cache_stats("chat"), "hits") or 0) - hits_before >= 40  # the repeats (some may race)
    output = read_file(client, batch.output_file_id)
    assert sorted(output) == sorted(f"req-{i}" for i in range(200))
    for i in range(0, 200, 9):
        row = output[f"req-{i}"]
        assert row["error"] is None and row["response"]["status_code"] == 200
        assert row["id"].startswith("batch_req_") and row["response"]["request_id"] == row["id"]
        online = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompts[i]}],
                                                temperature=0, max_tokens=4,
                                                extra_headers={"Cache-Control": "no-cache"})
        body = row["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 4
        assert body["choices"][0]["message"]["content"] == online.choices[0].message.content
    job = __import__("rq").job.Job.fetch(batch.id, connection=r)
    assert job.get_status() == "finished" and job.origin == keys.BATCH_QUEUE


def test_embeddings_batch_equals_online_embeddings(batch_server: Server, minilm_onnx: Path) -> None:
    client = batch_server.client()
    texts = [f"Sentence number {i} about {['cats', 'stocks', 'music', 'rain'][i % 4]}." for i in range(500)]
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": str(minilm_onnx), "input": text, "encoding_format": "float"}}
             for i, text in enumerate(texts)]
    started = time.monotonic()
    batch, _ = wait_done(client, submit(client, lines, "/v1/embeddings").id)
    print(f"500-line embeddings batch: {time.monotonic() - started:.1f}s")
    assert batch.status == "completed" and batch.request_counts.completed == 500, batch
    output = read_file(client, batch.output_file_id)
    vectors = np.array([output[f"e{i}"]["response"]["body"]["data"][0]["embedding"] for i in range(500)])
    reference = np.array(load_embedding(str(minilm_onnx)).embed(texts))
    cosines = (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosines.min() >= 0.9999
    online = client.embeddings.create(model=str(minilm_onnx), input=texts[:50], encoding_format="float",
                                      extra_headers={"Cache-Control": "no-cache"})
    assert np.allclose([d.embedding for d in online.data], vectors[:50], atol=1e-5)


def test_cancel_stops_feeding_and_keeps_the_lines_that_ran(batch_server: Server) -> None:
    client, model = batch_server.client(), batch_server.model
    lines = [chat_line(f"c{i}", model, f"Cancel test {i}", max_tokens=24, seed=i, temperature=1.0)
             for i in range(300)]
    batch = submit(client, lines)
    r = redis.Redis.from_url(batch_server.redis_url)
    stream, running = keys.batch_stream("chat", model), []
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < 20 and time.monotonic() < deadline:
        running.append(r.xpending(stream, keys.WORKER_GROUP)["pending"])
        time.sleep(0.01)
    # batch lines never take the slot kept for online traffic (MAX_BATCH_SIZE 8, BATCH_RESERVED_SLOTS 1) ...
    assert 0 < max(running) <= 7, running
    # ... and an online request is answered while the batch keeps running
    online = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "online"}],
                                            max_tokens=4)
    assert online.choices[0].finish_reason and client.batches.retrieve(batch.id).status == "in_progress"
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch, _ = wait_done(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelling_at and batch.cancelled_at
    counts = batch.request_counts
    assert 20 <= counts.completed < 300 and counts.total == 300
    output = read_file(client, batch.output_file_id)
    assert len(output) == counts.completed  # the lines in flight finished and were written, none half-done
    assert all(row["response"]["status_code"] == 200 for row in output.values())
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling again changes nothing


def test_input_file_is_checked_line_by_line_when_the_batch_runs(batch_server: Server) -> None:
    client, model = batch_server.client(), batch_server.model
    good = chat_line("ok", model, "hi")
    body = b"\n".join([json.dumps(good).encode(), b"{not json", json.dumps(good).encode(),
                       json.dumps(good | {"custom_id": "x", "url": "/v1/images"}).encode(),
                       json.dumps({"custom_id": "y", "method": "GET", "url": "/v1/embeddings", "body": {}}).encode()])
    upload = client.files.create(file=("bad.jsonl", body), purpose="batch")  # as OpenAI: the upload takes it
    assert upload.bytes == len(body) and client.files.content(upload.id).content == body + b"\n"
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch, _ = wait_done(client, batch.id)
    assert batch.status == "failed" and batch.failed_at and batch.errors is not None
    assert [(e.line, e.code) for e in batch.errors.data or []] == [
        (2, "invalid_json_line"), (3, "duplicate_custom_id"), (4, "invalid_url"), (5, "invalid_method")]
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("a.jsonl", jsonl([good])), purpose="fine-tune")
    # a well-formed file whose lines name another endpoint than the batch's: the batch fails, naming the line
    mixed = [chat_line("a", model, "hi"), {**chat_line("b", model, "hi"), "url": "/v1/embeddings"}]
    batch, _ = wait_done(client, submit(client, mixed).id)
    assert batch.status == "failed" and batch.errors is not None
    assert [(e.line, e.code) for e in batch.errors.data or []] == [(2, "mismatched_url")]


def test_failed_lines_go_to_the_error_file(batch_server: Server) -> None:
    client, model = batch_server.client(), batch_server.model
    lines = [chat_line("good", model, "hello"), chat_line("too-hot", model, "hello", temperature=5),
             chat_line("no-model", "no-such-model", "hello"), chat_line("streamed", model, "hello", stream=True)]
    batch, _ = wait_done(client, submit(client, lines).id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 3)
    assert list(read_file(client, batch.output_file_id)) == ["good"]
    errors = read_file(client, batch.error_file_id)
    assert {k: v["response"]["status_code"] for k, v in errors.items()} == \
        {"too-hot": 400, "no-model": 404, "streamed": 400}
    assert errors["too-hot"]["response"]["body"]["error"]["param"] == "temperature"
    assert errors["no-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(batch.id)  # a completed batch cannot be cancelled


def test_files_and_batches_listing(batch_server: Server) -> None:
    client, model = batch_server.client(), batch_server.model
    ids = [submit(client, [chat_line("one", model, f"list {i}")]).id for i in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    rest = client.batches.list(limit=2, after=first.data[-1].id)
    assert rest.data[0].id == ids[0]
    upload = client.files.create(file=("x.jsonl", jsonl([chat_line("z", model, "hi")])), purpose="batch")
    assert client.files.retrieve(upload.id).filename == "x.jsonl"
    assert upload.id in [f.id for f in client.files.list()]
    assert json.loads(client.files.content(upload.id).text)["custom_id"] == "z"
    assert client.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(upload.id)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")
    for batch_id in ids:
        wait_done(client, batch_id)


def test_axion_serve_runs_batches_too(served: Server) -> None:
    """The one-command server starts an rq batch worker with the rest."""
    client = served.client()
    batch, _ = wait_done(client, submit(client, [chat_line(f"s{i}", served.model, f"serve {i}") for i in range(3)]).id)
    assert batch.status == "completed" and batch.request_counts.completed == 3


def test_files_and_batches_belong_to_the_key_that_made_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two API keys on one server: neither sees, reads, deletes, cancels or batches the other's files and batches
    (the same 404 as for ids that do not exist), batch outputs included; each lists only its own."""
    port = free_port()
    env = axion_env(tiny_model_dir, None, port, MAX_SEQ_LEN="1024", SERVE_EMBEDDINGS="false",
                    API_KEYS="key-alpha,key-beta")
    proc = Proc(["serve"], env, tmp_path / "serve.log").start()
    base = f"http://127.0.0.1:{port}"
    alpha, beta = (openai.OpenAI(base_url=f"{base}/v1", api_key=k, max_retries=0) for k in ("key-alpha", "key-beta"))
    try:
        wait_ready(base, [proc])
        batch = submit(alpha, [chat_line("one", str(tiny_model_dir), "Hello")])
        done, _ = wait_done(alpha, batch.id)
        assert done.status == "completed" and done.output_file_id
        theirs = [batch.input_file_id, done.output_file_id]
        mine = beta.files.create(file=("mine.jsonl", jsonl([chat_line("x", str(tiny_model_dir), "hi")])),
                                 purpose="batch")
        for file_id in theirs:
            for call in (beta.files.retrieve, beta.files.content, beta.files.delete):
                with pytest.raises(openai.NotFoundError):
                    call(file_id)
        for call in (beta.batches.retrieve, beta.batches.cancel):
            with pytest.raises(openai.NotFoundError):
                call(batch.id)
        with pytest.raises(openai.NotFoundError, match="No such input file"):
            beta.batches.create(input_file_id=batch.input_file_id, endpoint="/v1/chat/completions",
                                completion_window="24h")
        assert [f.id for f in beta.files.list()] == [mine.id] and beta.batches.list().data == []
        assert {f.id for f in alpha.files.list()} == set(theirs)
        assert [b.id for b in alpha.batches.list()] == [batch.id]
        assert json.loads(alpha.files.content(done.output_file_id).text)["custom_id"] == "one"
        with pytest.raises(openai.NotFoundError):
            alpha.files.retrieve(mine.id)
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]
