"""Operating a fleet: /metrics under a known load, JSON logs with the request id, and the ops CLI (`axion status`,
`queues`, `dead-letters`) against a live `axion api` + `axion worker` on a real Redis, dead letter included."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from common import keys
from common.redis_server import EmbeddedRedis, free_port
from tests.conftest import REPO, Proc, axion_env, enqueue_orphan, next_event, subscribed

KEY = "sk-ops-test"
ENV = {"HEARTBEAT_TTL_S": "1.5", "VISIBILITY_TIMEOUT_S": "1", "MAX_DELIVERIES": "3", "CACHE_CAPACITY": "0",
       "LOG_FORMAT": "json", "API_KEYS": KEY, "MAX_BATCH_SIZE": "4"}
AUTH = {"Authorization": f"Bearer {KEY}"}


class Fleet:
    def __init__(self, model_dir: Path, redis_url: str, logs: Path) -> None:
        self.model = str(model_dir)
        self.redis_url = redis_url
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = axion_env(model_dir, redis_url, port, **ENV)
        self.api = Proc(["api"], self.env, logs / "api.log").start()
        self.worker = Proc(["worker"], self.env, logs / "worker.log").start()

    def ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for proc in (self.api, self.worker):
                if proc.process.poll() is not None:
                    pytest.fail(f"{proc.args} exited:\n{proc.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).json()["workers"]:
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        pytest.fail(f"fleet not ready:\n{self.api.log()[-2000:]}\n{self.worker.log()[-2000:]}")

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "axion.cli", *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    def cli_json(self, *args: str) -> object:
        proc = self.cli(*args, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def fleet(tiny_model_dir: Path, redis_server: EmbeddedRedis,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    redis.Redis.from_url(redis_server.url).flushall()
    fleet = Fleet(tiny_model_dir, redis_server.url, tmp_path_factory.mktemp("ops-logs"))
    try:
        fleet.ready()
        yield fleet
    finally:
        fleet.api.stop()
        fleet.worker.stop()


def _scrape(fleet: Fleet) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = httpx.get(f"{fleet.url}/metrics", headers=AUTH, timeout=5)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_a_known_load(fleet: Fleet) -> None:
    assert httpx.get(f"{fleet.url}/metrics", timeout=5).status_code == 401  # behind the API-key guard
    n, k = 3, 6
    before = _scrape(fleet)
    model = {"model_name": fleet.model}
    with httpx.Client(timeout=60, headers=AUTH) as http:
        for i in range(n):
            body = {"model": fleet.model, "messages": [{"role": "user", "content": f"metrics {i}"}],
                    "temperature": 0, "max_tokens": k, "ignore_eos": True, "stream": i == 0}
            resp = http.post(f"{fleet.url}/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
    after = _scrape(fleet)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("axion:request_success_total", finished_reason="length", **model) == n
    assert delta("axion:generation_tokens_total", **model) == n * k
    assert delta("axion:prompt_tokens_total", **model) > 0
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"axion:{histogram}_count", **model) == n, histogram
    assert delta("axion:inter_token_latency_seconds_count", **model) == n * (k - 1)
    assert delta("axion:cache_misses_total", cache="chat") == 0  # CACHE_CAPACITY=0: the cache is not read
    # the same series under vLLM's names, for dashboards written for vLLM (VLLM_METRIC_NAMES, on by default)
    assert delta("vllm:generation_tokens_total", **model) == n * k
    assert delta("vllm:request_success_total", finished_reason="length", **model) == n
    assert delta("vllm:time_to_first_token_seconds_count", **model) == n
    assert not any(name.startswith("vllm:") and "queue_depth" in name for name, _ in after)
    assert _value(after, "axion:num_requests_running", **model) == 0
    assert _value(after, "axion:num_requests_waiting", **model) == 0
    # fleet gauges, read from Redis at scrape time
    assert _value(after, "axion:redis_up") == 1
    queue = {"kind": "chat", "model_name": fleet.model}
    assert (("axion:queue_depth", tuple(sorted(queue.items()))) in after)
    assert _value(after, "axion:workers", **queue) == 1
    worker = [labels for name, labels in after if name == "axion:worker_max_batch_size"]
    assert len(worker) == 1 and _value(after, "axion:worker_max_batch_size", **dict(worker[0])) == 4
    assert any(name == "axion:worker_batch_occupancy" for name, _ in after)


def test_json_logs_carry_the_request_id(fleet: Fleet) -> None:
    body = {"model": fleet.model, "messages": [{"role": "user", "content": "log me"}], "max_tokens": 3}
    resp = httpx.post(f"{fleet.url}/v1/chat/completions", json=body, headers=AUTH | {"X-Request-Id": "abc"},
                      timeout=60)
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "abc"
    deadline = time.monotonic() + 5
    mine: list[dict] = []
    while not mine and time.monotonic() < deadline:
        lines = [line for line in fleet.api.log().splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]  # every line of the API's log is one JSON object
        mine = [r for r in records if r["request_id"] == "abc" and r.get("job_id")]
        time.sleep(0.1)
    assert mine, fleet.api.log()[-2000:]
    line = mine[0]
    assert {"time", "level", "logger", "message", "process"} <= line.keys()
    assert line["level"] == "INFO" and line["logger"] == "axion.api.jobs" and line["model"] == fleet.model
    assert line["job_id"].startswith("abc.") and line["duration_ms"] > 0 and "ttft_ms" in line
    assert line["completion_tokens"] >= 1
    worker_lines = [json.loads(line) for line in fleet.worker.log().splitlines() if line.startswith("{")]
    assert worker_lines and all("process" in r for r in worker_lines)


def _make_dead_letter(fleet: Fleet, request_id: str) -> None:
    """As tests/test_recovery_e2e.py does: a 'ghost' consumer took the job and it was delivered too often."""
    from common.protocol import ChatJob, ChatMessage, SamplingParams

    r = redis.Redis.from_url(fleet.redis_url)
    job = ChatJob(request_id=request_id, model=fleet.model, messages=[ChatMessage(role="user", content="hi")],
                  params=SamplingParams(temperature=0.0, max_tokens=2), created=time.time())
    enqueue_orphan(r, keys.chat_stream(fleet.model), job, delivered=5)
    deadline = time.monotonic() + 15
    while not r.xlen(keys.dead_letter_stream("chat", fleet.model)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.xlen(keys.dead_letter_stream("chat", fleet.model)), fleet.worker.log()[-2000:]


def test_ops_cli_status_queues_and_dead_letters(fleet: Fleet) -> None:

    _make_dead_letter(fleet, "poison-ops")
    status = fleet.cli_json("status")
    assert fleet.model in status["models"]
    [worker] = status["workers"]
    assert worker["kind"] == "chat" and worker["device"] and worker["max_batch_size"] == 4
    assert worker["heartbeat_age_s"] is not None and worker["heartbeat_age_s"] < 3
    [queue] = [q for q in status["queues"] if q["kind"] == "chat" and q["model"] == fleet.model]
    assert queue["dead_letters"] == 1 and queue["pending"] == 0 and queue["lag"] == 0 and queue["workers"] == 1
    assert {c["cache"] for c in status["caches"]} == {"chat", "embed"}
    text = fleet.cli("status")
    assert text.returncode == 0 and "WORKER_ID" in text.stdout and "DEAD_LETTERS" in text.stdout
    assert fleet.model in text.stdout and "HIT_RATE" in text.stdout

    [row] = fleet.cli_json("queues")
    assert row["dead_letters"] == 1 and row["length"] == 0

    [dead] = fleet.cli_json("dead-letters", "list")
    assert dead["request_id"] == "poison-ops" and dead["deliveries"] == 6 and dead["kind"] == "chat"
    listing = fleet.cli("dead-letters", "list")
    assert dead["id"] in listing.stdout and "poison-ops" in listing.stdout

    r = redis.Redis.from_url(fleet.redis_url)
    pubsub = subscribed(r, "poison-ops")
    retried = fleet.cli_json("dead-letters", "retry", dead["id"])
    assert [d["id"] for d in retried] == [dead["id"]]
    assert r.xlen(keys.dead_letter_stream("chat", fleet.model)) == 0
    events = []
    while (event := next_event(pubsub)) is not None:
        events.append(event)
        if type(event).__name__ == "Finished":
            break
    names = [type(e).__name__ for e in events]
    assert names and names[0] == "Accepted" and names[-1] == "Finished", names

    # drop: a dead letter written straight into the dead stream
    entry = r.xadd(keys.dead_letter_stream("chat", fleet.model), {"job": b"{}", "deliveries": b"4"}).decode()
    dropped = fleet.cli("dead-letters", "drop", entry)
    assert dropped.returncode == 0 and "dropped 1" in dropped.stdout
    assert r.xlen(keys.dead_letter_stream("chat", fleet.model)) == 0
    assert fleet.cli("dead-letters", "drop", "1-1").returncode == 1

    # Batch API lines waiting in a model's low-priority stream show in `axion queues` (an embed stream here, which
    # no worker of this fleet reads, so the count holds still)
    batch_stream = keys.batch_stream("embed", fleet.model)
    for _ in range(2):
        r.xadd(batch_stream, {"job": b"{}"})
    try:
        [row] = [q for q in fleet.cli_json("queues") if q["kind"] == "embed"]
        assert row["batch_lines"] == 2 and row["length"] == 0
        assert "BATCH_LINES" in fleet.cli("queues").stdout
    finally:
        r.delete(batch_stream)


def test_queues_watch_refreshes_until_ctrl_c(fleet: Fleet) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "axion.cli", "queues", "--watch", "0.2"], env=fleet.env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out.count("LENGTH") >= 2 and "Ctrl-C" in out


def test_metrics_answer_while_redis_is_unreachable(fleet: Fleet, tmp_path: Path) -> None:
    """A second API on a Redis port nobody listens on: /metrics still answers 200, with redis_up 0."""
    port = free_port()
    env = axion_env(Path(fleet.model), f"redis://127.0.0.1:{free_port()}/0", port, **ENV)
    api = Proc(["api"], env, tmp_path / "api.log").start()
    try:
        deadline = time.monotonic() + 60
        resp = None
        while time.monotonic() < deadline:
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=AUTH, timeout=5)
                break
            except httpx.HTTPError:
                if api.process.poll() is not None:
                    pytest.fail(api.log()[-2000:])
                time.sleep(0.2)
        assert resp is not None and resp.status_code == 200, (resp and resp.text, api.log()[-2000:])
        families = {f.name: f for f in text_string_to_metric_families(resp.text)}
        assert families["axion:redis_up"].samples[0].value == 0
        assert "axion:queue_depth" not in {s.name for f in families.values() for s in f.samples}
    finally:
        api.stop()

