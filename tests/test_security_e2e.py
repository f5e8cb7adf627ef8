"""API keys, per-key models, rate limits across replicas, CORS, open paths and log hygiene, over real HTTP.

One fleet on its own Redis: a chat worker and two `axion api` replicas with keys required. Replica A has CORS on
and the default open paths; replica B has CORS off and the OpenAPI schema open as well.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis

from common import apikeys
from common.redis_server import EmbeddedRedis, free_port
from tests.conftest import REPO, Proc, Server, axion_env, wait_ready

STATIC_KEY = "axn-static-test-key-0123456789abcdef"
ORIGIN = "https://app.example"
SECRET_PROMPT = "zebra-marmalade-7731 is the secret prompt"


class Fleet:
    def __init__(self, a: Server, b: Server, redis_url: str, procs: list[Proc]) -> None:
        self.a, self.b, self.redis_url, self.procs = a, b, redis_url, procs
        self.model = a.model

    def key(self, **limits: object) -> str:
        """A new Redis-stored key (as `axion keys create` makes them)."""
        r = redis.Redis.from_url(self.redis_url)
        key, _ = apikeys.create(r, name=f"test-{time.monotonic_ns()}", **limits)  # type: ignore[arg-type]
        r.close()
        return key


@pytest.fixture(scope="module")
def fleet(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    logs = tmp_path_factory.mktemp("security-logs")
    with EmbeddedRedis() as server:
        ports = [free_port(), free_port()]
        common = {"API_KEYS": f"{STATIC_KEY}, axn-second-static-key", "MAX_BATCH_SIZE": "4"}
        procs = [Proc(["worker"], axion_env(tiny_model_dir, server.url, ports[0], **common), logs / "worker.log")]
        procs.append(Proc(["api"], axion_env(tiny_model_dir, server.url, ports[0], CORS_ALLOW_ORIGINS=ORIGIN,
                                             **common), logs / "api-a.log"))
        procs.append(Proc(["api"], axion_env(tiny_model_dir, server.url, ports[1], OPEN_PATHS="/health,/schema/*",
                                             **common), logs / "api-b.log"))
        for proc in procs:
            proc.start()
        a, b = (Server(f"http://127.0.0.1:{port}", str(tiny_model_dir), procs, server.url) for port in ports)
        try:
            for s in (a, b):
                wait_ready(s.base_url, procs)
            yield Fleet(a, b, server.url, procs)
        finally:
            codes = [proc.stop() for proc in procs]
            assert codes == [0, 0, 0], "\n".join(p.log()[-2000:] for p in procs)


def client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=60)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_envelope(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


def test_missing_or_wrong_key_is_a_401_in_openai_shape(fleet: Fleet) -> None:
    for server in (fleet.a, fleet.b):
        for headers in ({}, bearer("axn-wrong"), {"Authorization": f"Basic {STATIC_KEY}"}, bearer(STATIC_KEY[:-1])):
            resp = httpx.post(f"{server.base_url}/v1/chat/completions", headers=headers, json={})
            assert_envelope(resp, 401, "invalid_api_key")
            assert resp.headers["x-request-id"]
        with pytest.raises(openai.AuthenticationError) as info:
            client(server, "axn-wrong").models.list()
        assert info.value.code == "invalid_api_key"


def test_health_is_open_and_open_paths_are_a_setting(fleet: Fleet) -> None:
    for server in (fleet.a, fleet.b):
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        for path in ("/v1/models", "/tokenize", "/v1/embeddings", "/rerank"):
            method = "GET" if path == "/v1/models" else "POST"
            assert httpx.request(method, f"{server.base_url}{path}").status_code == 401
    assert_envelope(httpx.get(f"{fleet.a.base_url}/schema/openapi.json"), 401, "invalid_api_key")
    assert httpx.get(f"{fleet.b.base_url}/schema/openapi.json").json()["openapi"].startswith("3.")
    assert httpx.get(f"{fleet.a.base_url}/schema/openapi.json", headers=bearer(STATIC_KEY)).status_code == 200


def test_static_and_stored_keys_serve_requests(fleet: Fleet) -> None:
    for key in (STATIC_KEY, "axn-second-static-key", fleet.key()):
        for server in (fleet.a, fleet.b):
            reply = client(server, key).chat.completions.create(
                model=fleet.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert reply.choices[0].finish_reason in ("length", "stop")


def run_keys(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"REDIS_URL": fleet.redis_url, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "axion.cli", "keys", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_axion_keys_create_list_revoke(fleet: Fleet) -> None:
    made = run_keys(fleet, "create", "--name", "cli-key", "--models", fleet.model, "--rpm", "100")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("axn-") and len(key) > 40
    listed = run_keys(fleet, "list")
    line = next(x for x in listed.stdout.splitlines() if "cli-key" in x)
    assert apikeys.key_id(key) in line and key not in listed.stdout and "rpm=100" in line
    stored = redis.Redis.from_url(fleet.redis_url).hgetall("axion:apikeys")
    assert key.encode() not in b"".join(k + v for k, v in stored.items())  # only its hash is kept
    assert client(fleet.a, key).models.list().data[0].id == fleet.model
    assert run_keys(fleet, "revoke", "cli-key").returncode == 0
    assert run_keys(fleet, "revoke", "cli-key").returncode == 1
    time.sleep(2.5)  # replicas remember a checked key for up to 2 s
    for server in (fleet.a, fleet.b):
        with pytest.raises(openai.AuthenticationError):
            client(server, key).models.list()


def test_a_key_sees_and_uses_only_its_models(fleet: Fleet) -> None:
    limited = fleet.key(models=["someone/else"])
    allowed = fleet.key(models=[fleet.model])
    assert client(fleet.a, limited).models.list().data == []
    assert [m.id for m in client(fleet.b, allowed).models.list().data] == [fleet.model]
    body = {"model": fleet.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    hidden = httpx.post(f"{fleet.a.base_url}/v1/chat/completions", json=body, headers=bearer(limited))
    missing = httpx.post(f"{fleet.a.base_url}/v1/chat/completions", json=body | {"model": "no/such-model"},
                         headers=bearer(allowed))
    hidden_error, missing_error = (assert_envelope(r, 404, "model_not_found") for r in (hidden, missing))
    assert hidden_error["param"] == missing_error["param"] == "model"
    assert hidden_error["message"].replace(fleet.model, "X") == missing_error["message"].replace("no/such-model", "X")
    for path, extra in (("/tokenize", {"prompt": "hi"}), ("/v1/completions", {"prompt": "hi", "max_tokens": 1})):
        resp = httpx.post(f"{fleet.b.base_url}{path}", json={"model": fleet.model, **extra}, headers=bearer(limited))
        assert_envelope(resp, 404, "model_not_found")
    assert httpx.post(f"{fleet.b.base_url}/v1/chat/completions", json=body, headers=bearer(allowed)).status_code == 200


def burst(fleet: Fleet, key: str, count: int, send: object) -> list[httpx.Response]:
    """`count` requests at once, alternating between the two replicas."""
    servers = [fleet.a, fleet.b]
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda i: send(servers[i % 2], key), range(count)))  # type: ignore[operator]


def test_requests_per_minute_hold_across_two_replicas(fleet: Fleet) -> None:
    key = fleet.key(rpm=10)
    replies = burst(fleet, key, 20, lambda s, k: httpx.get(f"{s.base_url}/v1/models", headers=bearer(k), timeout=30))
    ok = [r for r in replies if r.status_code == 200]
    limited = [r for r in replies if r.status_code == 429]
    assert len(ok) + len(limited) == 20 and len(ok) in (10, 11)  # the bucket refills 1 per 6 s
    assert {r.headers["x-ratelimit-limit-requests"] for r in replies} == {"10"}
    assert min(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == 0
    assert all(r.headers["x-ratelimit-reset-requests"].endswith("s") for r in replies)
    error = assert_envelope(limited[0], 429, "rate_limit_exceeded")
    assert error["type"] == "requests" and 1 <= int(limited[0].headers["retry-after"]) <= 6
    with pytest.raises(openai.RateLimitError):
        client(fleet.a, key).models.list()


def test_tokens_per_minute_hold_across_two_replicas(fleet: Fleet) -> None:
    key = fleet.key(tpm=1000)
    prompt = "word " * 80  # 400 characters: charged 100 tokens (4 characters a token, no output)

    def tokenize(server: Server, k: str) -> httpx.Response:
        return httpx.post(f"{server.base_url}/tokenize", json={"model": fleet.model, "prompt": prompt},
                          headers=bearer(k), timeout=60)

    replies = burst(fleet, key, 20, tokenize)
    ok = [r for r in replies if r.status_code == 200]
    assert len(ok) in (10, 11) and all(r.json()["count"] > 0 for r in ok)
    limited = [r for r in replies if r.status_code == 429]
    assert assert_envelope(limited[0], 429, "rate_limit_exceeded")["type"] == "tokens"
    assert {r.headers["x-ratelimit-limit-tokens"] for r in replies} == {"1000"}
    assert "x-ratelimit-limit-requests" not in ok[0].headers  # no requests limit on this key
    huge = httpx.post(f"{fleet.a.base_url}/v1/chat/completions", headers=bearer(fleet.key(tpm=50)),
                      json={"model": fleet.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60})
    assert assert_envelope(huge, 429, "rate_limit_exceeded")["message"].startswith("Request too large")
    assert huge.headers["x-should-retry"] == "false"


def test_cors_is_configurable_and_off_by_default(fleet: Fleet) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    on = httpx.options(f"{fleet.a.base_url}/v1/chat/completions", headers=preflight)
    assert on.status_code == 204 and on.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in on.headers["access-control-allow-headers"].lower()
    simple = httpx.get(f"{fleet.a.base_url}/v1/models", headers={"Origin": ORIGIN, **bearer(STATIC_KEY)})
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in simple.headers["access-control-expose-headers"]
    stranger = httpx.get(f"{fleet.a.base_url}/v1/models", headers={"Origin": "https://evil.example",
                                                                   **bearer(STATIC_KEY)})
    assert "access-control-allow-origin" not in stranger.headers
    off = httpx.options(f"{fleet.b.base_url}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    assert "access-control-allow-origin" not in httpx.get(f"{fleet.b.base_url}/health", headers=preflight).headers


def test_logs_carry_request_ids_but_no_prompt_or_key(fleet: Fleet) -> None:
    key = fleet.key()
    for server, rid in ((fleet.a, "sec-log-a"), (fleet.b, "sec-log-b")):
        body = {"model": fleet.model, "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 3}
        assert httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60,
                          headers={**bearer(key), "X-Request-Id": rid}).status_code == 200
        assert httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60,
                          headers={**bearer("axn-" + SECRET_PROMPT.replace(" ", "-")),
                                   "X-Request-Id": f"{rid}-refused"}).status_code == 401
    time.sleep(0.5)
    for proc in fleet.procs:
        text = proc.log()
        assert SECRET_PROMPT not in text and "zebra-marmalade" not in text
        assert key not in text and STATIC_KEY not in text
    api_a = fleet.procs[1].log()
    served = next(line for line in api_a.splitlines() if "request sec-log-a." in line)
    assert "[sec-log-a]" in served  # the request id field of the log format
    refused = [line for line in api_a.splitlines() if "[sec-log-a-refused]" in line]
    assert refused and "refused POST /v1/chat/completions: 401 invalid_api_key" in refused[0]
    axion_lines = [line for line in api_a.splitlines() if " axion" in line and " INFO " in line]
    assert axion_lines and all("] [" in line for line in axion_lines)


def test_schema_has_request_bodies(fleet: Fleet) -> None:
    doc = httpx.get(f"{fleet.b.base_url}/schema/openapi.json").json()
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert json.dumps(doc).count("ErrorResponse") > 10
