"""The request guard covers routes it has never heard of (say a `/debug/vars` added later), OPEN_PATHS included,
and refuses what it can before the handler runs. Litestar's test client on the real app, real Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from litestar import get
from litestar.testing import TestClient

from axion.app import create_app
from common.redis_server import EmbeddedRedis
from common.settings import load_settings

KEY = "axn-guard-test-key"


@get("/debug/vars", media_type="text/plain")
async def debug_vars() -> str:
    return "axion_up 1\n"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with EmbeddedRedis() as server:
        yield server.url


def client(redis_url: str, **env: str) -> TestClient:
    app = create_app(load_settings({"REDIS_URL": redis_url, "API_KEYS": KEY, **env}))
    app.register(debug_vars)
    return TestClient(app)


def test_routes_added_later_need_a_key_unless_open(redis_url: str) -> None:
    with client(redis_url) as c:
        # /health/ready: 503 here (no worker), but past the guard
        for path in ("/debug/vars", "/metrics", "/health/ready"):
            refused = c.get(path)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            assert c.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code in (200, 503)
        assert c.get("/health").status_code == 200
    with client(redis_url, OPEN_PATHS="/health,/health/ready,/metrics,/debug/vars") as c:
        assert c.get("/debug/vars").text == "axion_up 1\n"
        assert "axion:redis_up 1.0" in c.get("/metrics").text
        assert c.get("/metrics").headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"
        assert c.get("/health/ready").json()["status"] == "not_ready"
        assert c.get("/v1/models").status_code == 401


def test_bodies_are_limited_before_the_handler(redis_url: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    with client(redis_url, MAX_BODY_BYTES="1000", MAX_MESSAGES="2", MAX_STRING_CHARS="50") as c:
        big = c.post("/v1/chat/completions", content=b"{" + b" " * 2000 + b"}", headers=auth)
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        messages = [{"role": "user", "content": "hi"}] * 3
        many = c.post("/v1/chat/completions", json={"model": "m", "messages": messages}, headers=auth)
        assert many.status_code == 400 and many.json()["error"]["param"] == "messages"
        long = c.post("/v1/embeddings", json={"model": "m", "input": ["ok", "x" * 51]}, headers=auth)
        assert long.status_code == 400 and long.json()["error"]["param"] == "input[1]"
        deep = c.post("/v1/completions", content=b'{"prompt": ' + b"[" * 400 + b"]" * 400 + b"}", headers=auth)
        assert deep.status_code in (400, 413)
        bad_model = c.post("/tokenize", json={"model": "../../etc/passwd", "prompt": "x"}, headers=auth)
        assert bad_model.status_code == 400 and bad_model.json()["error"]["param"] == "model"
        absolute = c.post("/tokenize", json={"model": "/etc/passwd", "prompt": "x"}, headers=auth)
        assert absolute.status_code == 400 and "Absolute paths" in absolute.json()["error"]["message"]
        unknown = c.post("/tokenize", json={"model": "org/unknown", "prompt": "x"}, headers=auth)
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        assert len(unknown.headers["x-request-id"]) == 32


def test_generated_request_id_is_the_one_in_logs_and_headers(redis_url: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """With CORS on (whose middleware reads the headers first) the id the guard makes is still the one the
    handler sees, logs and echoes."""
    with client(redis_url, CORS_ALLOW_ORIGINS="https://app.example") as c, caplog.at_level("INFO", "axion"):
        resp = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}",
                                                       "Origin": "https://app.example"},
                      json={"model": "org/none", "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 404 and resp.headers["access-control-allow-origin"] == "https://app.example"
        rid = resp.headers["x-request-id"]
        assert len(rid) == 32 and f"request {rid}." in caplog.text


def test_rate_limit_rejections_are_counted_in_metrics(redis_url: str) -> None:
    import redis as redis_sync

    redis_sync.Redis.from_url(redis_url).flushall()  # fresh buckets
    auth = {"Authorization": f"Bearer {KEY}"}
    # an open /metrics: a scrape with the key would spend the key's own request budget
    with client(redis_url, RATE_LIMIT_RPM="1", OPEN_PATHS="/health,/metrics") as c:
        codes = [c.post("/tokenize", json={"model": "m", "prompt": "x"}, headers=auth).status_code for _ in range(3)]
        assert codes.count(429) == 2, codes
        text = c.get("/metrics").text
        assert 'axion:rate_limit_rejections_total{limit="requests"} 2.0' in text, text


POST_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/rerank", "/tokenize",
              "/detokenize", "/v1/batches", "/admin/models/load"]


@pytest.mark.parametrize("path", POST_PATHS)
def test_invalid_utf8_and_non_json_bodies_are_400_and_415_envelopes(redis_url: str, path: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    with client(redis_url, ADMIN_API_KEYS=KEY) as c:
        bad = c.post(path, content=b'{"model":"\xff"}', headers=auth | {"content-type": "application/json"})
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"] == {"message": "The body is not valid UTF-8.", "type": "invalid_request_error",
                                       "param": None, "code": "invalid_json"}
        plain = c.post(path, content=b'{"model":"m"}', headers=auth | {"content-type": "text/plain"})
        assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
        assert plain.json()["error"]["param"] == "Content-Type"


def test_json_content_types_and_multipart_uploads_pass(redis_url: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    with client(redis_url) as c:
        for content_type in ("application/json; charset=utf-8", "application/vnd.api+json", None):
            headers = auth | ({"content-type": content_type} if content_type else {})
            resp = c.post("/tokenize", content=b'{"model":"org/none","prompt":"x"}', headers=headers)
            assert resp.status_code == 404, (content_type, resp.text)  # past the body checks: no such model
        upload = c.post("/v1/files", files={"file": ("b.jsonl", b"\xff\n")}, data={"purpose": "batch"}, headers=auth)
        assert upload.status_code == 200 and upload.json()["bytes"] == 2  # any bytes: lines are checked per batch


def test_head_on_health_routes(redis_url: str) -> None:
    with client(redis_url, OPEN_PATHS="/health,/health/ready") as c:
        live = c.head("/health")
        assert live.status_code == 200 and live.content == b""
        ready = c.head("/health/ready")
        assert ready.status_code == 503 and ready.content == b""  # no worker here: what GET answers too
        assert c.get("/health/ready").status_code == 503


def test_prompts_that_cannot_fit_and_huge_schemas_are_refused_before_queueing(redis_url: str) -> None:
    """MAX_SEQ_LEN=64: more than 64 x 64 characters (or 64 token ids) cannot fit, whatever the tokenizer."""
    auth = {"Authorization": f"Bearer {KEY}"}
    with client(redis_url, MAX_SEQ_LEN="64") as c:
        def post(path: str, body: dict) -> dict:
            resp = c.post(path, json={"model": "org/none", **body}, headers=auth)
            return {"status": resp.status_code, **resp.json()["error"]}

        words = "x" * 4097
        chat = post("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text",
                                                                                      "text": words}]}]})
        assert chat["status"] == 400 and chat["code"] == "context_length_exceeded" and chat["param"] == "messages"
        assert "4097 characters" in chat["message"]
        two = post("/v1/completions", {"prompt": ["ok", words]})
        assert two["code"] == "context_length_exceeded" and two["param"] == "prompt[1]"
        ids = post("/v1/completions", {"prompt": list(range(65))})
        assert ids["code"] == "context_length_exceeded" and "65 tokens" in ids["message"]
        assert post("/tokenize", {"prompt": words})["code"] == "context_length_exceeded"
        # At the bound it passes the guard (the model is unknown: 404), so the check is not off by one.
        assert post("/v1/completions", {"prompt": "x" * 4096})["status"] == 404
        assert post("/v1/completions", {"prompt": list(range(64))})["status"] == 404
        properties = {f"p{i}": {"type": "integer"} for i in range(5000)}
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                             "properties": properties}}}
        schema = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [tool]})
        assert schema["status"] == 400 and schema["code"] == "invalid_schema" and schema["param"] == "tools"
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": tool["function"]["parameters"]}}
        schema = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                               "response_format": fmt})
        assert schema["code"] == "invalid_schema" and schema["param"] == "response_format"


def test_the_console_page_is_open_and_its_fleet_view_needs_an_admin_key(redis_url: str) -> None:
    with client(redis_url, ADMIN_API_KEYS="admin-key") as c:
        page = c.get("/console")
        assert page.status_code == 200 and "Axion console" in page.text
        assert c.get("/console/fleet").status_code == 401
        tenant = c.get("/console/fleet", headers={"Authorization": f"Bearer {KEY}"})
        assert tenant.status_code == 403  # an API key, not an admin key
        fleet = c.get("/console/fleet", headers={"Authorization": "Bearer admin-key"})
        assert fleet.status_code == 200 and fleet.json()["workers"] == []
