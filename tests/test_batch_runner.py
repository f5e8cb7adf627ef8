"""The batch runner in-process against the real test Redis, for what needs no worker: an expired batch, an
unusable input file, and the import rule (no Litestar, no torch in an rq work horse)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
import redis.asyncio as aioredis

from batches.files import FileStore, check_lines, split_upload
from batches.runner import BatchRunner
from batches.store import BatchStore
from common import keys
from common.keys import ANONYMOUS_OWNER as ANONYMOUS
from common.redis_server import EmbeddedRedis
from common.settings import load_settings
from tests.conftest import REPO


def lines(n: int) -> bytes:
    return b"\n".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings",
                                  "body": {"model": "m", "input": f"text {i}"}}).encode() for i in range(n))


async def _expired(url: str) -> tuple[str, dict, list[dict]]:
    redis = aioredis.from_url(url)
    try:
        upload = await FileStore(redis).create("in.jsonl", "batch", lines(3), ANONYMOUS)
        store = BatchStore(redis)
        batch_id = await store.create(upload.id, "/v1/embeddings", "24h", {"team": "eval"})
        await store.update(batch_id, expires_at=int(time.time()) - 1)  # the window closed before it ran
        final = await BatchRunner(load_settings({"REDIS_URL": url}), batch_id).run()
        batch = await store.get(batch_id)
        content = await FileStore(redis).content(batch["error_file_id"], ANONYMOUS)
        error_lines = [json.loads(x) for x in content.splitlines()]
        return final, batch, error_lines
    finally:
        await redis.aclose()


def test_an_expired_batch_reports_every_unsent_line(redis_server: EmbeddedRedis) -> None:
    final, batch, error_lines = asyncio.run(_expired(redis_server.url))
    assert final == batch["status"] == "expired" and batch["expired_at"] and batch["output_file_id"] is None
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert batch["metadata"] == {"team": "eval"}
    assert sorted(x["custom_id"] for x in error_lines) == ["r0", "r1", "r2"]
    assert all(x["response"] is None and x["error"]["code"] == "batch_expired" for x in error_lines)


async def _missing_input(url: str) -> dict:
    redis = aioredis.from_url(url)
    try:
        store = BatchStore(redis)
        batch_id = await store.create("file-gone", "/v1/embeddings", "24h", None)
        assert await BatchRunner(load_settings({"REDIS_URL": url}), batch_id).run() == "failed"
        assert await redis.hget(keys.batch(batch_id), "failed_at")
        return await store.get(batch_id)
    finally:
        await redis.aclose()


def test_a_batch_whose_input_file_is_gone_fails(redis_server: EmbeddedRedis) -> None:
    batch = asyncio.run(_missing_input(redis_server.url))
    assert batch["status"] == "failed" and batch["errors"]["data"][0]["code"] == "invalid_input_file"


@pytest.mark.parametrize("module", ["batches.runner", "batches.queue"])
def test_the_rq_side_imports_neither_litestar_nor_torch(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in ('litestar', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def _restricted(url: str) -> dict[str, int]:
    redis = aioredis.from_url(url)
    try:
        await redis.sadd(keys.KNOWN_MODELS, "open-model", "secret-model")  # both announced once, no worker now
        body = b"\n".join(json.dumps({"custom_id": m, "method": "POST", "url": "/v1/embeddings",
                                      "body": {"model": m, "input": "x"}}).encode()
                          for m in ("open-model", "secret-model"))
        upload = await FileStore(redis).create("in.jsonl", "batch", body, ANONYMOUS)
        store = BatchStore(redis)
        batch_id = await store.create(upload.id, "/v1/embeddings", "24h", None, frozenset({"open-model"}))
        settings = load_settings({"REDIS_URL": url, "WORKER_GRACE_S": "0"})
        assert await BatchRunner(settings, batch_id).run() == "completed"
        batch = await store.get(batch_id)
        rows = [json.loads(x) for x in (await FileStore(redis).content(batch["error_file_id"], ANONYMOUS)).splitlines()]
        return {row["custom_id"]: row["response"]["status_code"] for row in rows}
    finally:
        await redis.aclose()


def test_lines_are_held_to_the_creating_keys_models(redis_server: EmbeddedRedis) -> None:
    """A key limited to some models cannot reach others through a batch: that line is a 404 (as online), while
    the allowed model gets as far as the fleet (503: no worker in this test)."""
    assert asyncio.run(_restricted(redis_server.url)) == {"open-model": 503, "secret-model": 404}


def test_input_lines_are_checked_when_the_batch_runs() -> None:
    good = {"custom_id": "ok", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}
    body = b"\n".join([json.dumps(good).encode(), b"", b"{not json", json.dumps(good).encode(), b"\xff\xfe",
                       json.dumps(good | {"custom_id": "u", "url": "/v1/images"}).encode(),
                       json.dumps(good | {"custom_id": "c", "url": "/v1/completions"}).encode(),
                       json.dumps(good | {"custom_id": "g", "method": "GET"}).encode(),
                       json.dumps(good | {"custom_id": "n", "body": {"model": 3}}).encode()]) + b"\n"
    raws = split_upload(body)
    assert len(raws) == 9 and raws[1] == b""  # blank lines kept: numbers are the file's
    requests, errors = check_lines(raws, "/v1/embeddings", 100)
    assert [r.custom_id for r in requests] == ["ok"]
    assert [(e["line"], e["code"]) for e in errors] == [
        (3, "invalid_json_line"), (4, "duplicate_custom_id"), (5, "invalid_json_line"), (6, "invalid_url"),
        (7, "mismatched_url"), (8, "invalid_method"), (9, "invalid_request")]
    assert [e["code"] for e in check_lines([], "/v1/embeddings", 100)[1]] == ["empty_file"]
    many = split_upload(lines(5))
    assert check_lines(many, "/v1/embeddings", 4)[1][0]["code"] == "too_many_requests"
    assert not check_lines(many, "/v1/embeddings", 5)[1]
    junk = [b"x"] * 150
    listed = check_lines(junk, "/v1/embeddings", 1000)[1]
    assert len(listed) == 101 and listed[-1] == {"code": "more_errors", "line": None, "param": None,
                                                 "message": "50 more problem(s) not listed."}
