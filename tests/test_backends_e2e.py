"""One contract, every in-process backend: the same end-to-end tests against a fleet (one `axion api`, two
`axion worker`s, a real Redis) whose workers run the native engine, then vLLM's (its CPU build; skipped where
`make vllm` has not installed it). Through the official SDK and raw HTTP: stream and not, `n`, logprobs, a JSON
schema, a forced tool call, stop strings, clients that leave, a deadline, and kill -9 of a worker mid-stream.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis

from common import keys
from common.redis_server import EmbeddedRedis, free_port
from tests.conftest import Proc, Server, axion_env, get_json, wait_ready
from tests.test_prompt_logprobs_e2e import prompt_ids, reference
from tests.test_recovery_e2e import _stream

ENV = {"HEARTBEAT_TTL_S": "1.5", "VISIBILITY_TIMEOUT_S": "2", "MAX_BATCH_SIZE": "8", "CONCURRENT_REQUESTS": "32",
       "CACHE_CAPACITY": "0", "SSE_KEEPALIVE_S": "0.5", "MAX_SEQ_LEN": "1024",
       "VLLM_ENGINE_ARGS": json.dumps({"enforce_eager": True}), "VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM = importlib.util.find_spec("vllm") is not None
BACKENDS = ["native", pytest.param("vllm", marks=pytest.mark.skipif(not VLLM, reason="vLLM is not installed"))]
ASK = [{"role": "user", "content": "Write one line about the sea."}]


class Fleet(Server):
    """An API and two workers of one backend on their own Redis."""

    def __init__(self, backend: str, model_dir: Path, logs: Path) -> None:
        self.backend, self.logs, self.model_dir = backend, logs, model_dir
        self.redis = EmbeddedRedis().start()
        port = free_port()
        self.env = axion_env(model_dir, self.redis.url, port, BACKEND=backend, **ENV)
        api = Proc(["api"], self.env, logs / "api.log").start()
        super().__init__(f"http://127.0.0.1:{port}", str(model_dir), [api], self.redis.url)
        self.workers = [self.start_worker() for _ in range(2)]

    def start_worker(self) -> Proc:
        n = len(list(self.logs.glob("worker*.log")))
        return Proc(["worker"], self.env, self.logs / f"worker{n}.log").start()

    def ensure_two_workers(self) -> None:
        self.workers = [w for w in self.workers if w.process.poll() is None]
        while len(self.workers) < 2:
            self.workers.append(self.start_worker())
        wait_ready(self.base_url, [self.procs[0], *self.workers], workers=2, timeout=240)

    def chat_workers(self) -> list[dict[str, Any]]:
        return [w for w in get_json(f"{self.base_url}/health")["workers"] if w["kind"] == "chat"]

    def stop(self) -> None:
        for proc in [*self.procs, *self.workers]:
            proc.stop()
        self.redis.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def fleet(request: pytest.FixtureRequest, tiny_model_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(request.param, tiny_model_dir, tmp_path_factory.mktemp(f"backend-{request.param}"))
    try:
        fleet.ensure_two_workers()
        yield fleet
    finally:
        fleet.stop()


def gone(procs: list[psutil.Process], timeout: float = 20) -> list[psutil.Process]:
    """Wait for `procs` to end; those still alive (a zombie counts as ended: it holds no memory)."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    still = []
    for proc in alive:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                still.append(proc)
        except psutil.NoSuchProcess:
            continue
    return still


def engine_processes(pid: int) -> list[psutil.Process]:
    """A worker's child processes that belong to its engine: vLLM's engine core and model runner (multiprocessing's
    resource tracker serves the whole process and stays)."""
    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def greedy(fleet: Fleet, prompt: str, tokens: int = 24, **extra: Any) -> Any:
    return fleet.client().chat.completions.create(model=fleet.model, messages=[{"role": "user", "content": prompt}],
                                                  temperature=0, max_tokens=tokens, **extra)


def test_workers_announce_their_backend_and_engine_figures(fleet: Fleet) -> None:
    workers = fleet.chat_workers()
    assert [w["backend"] for w in workers] == [fleet.backend] * 2
    models = get_json(f"{fleet.base_url}/v1/models")["data"]
    assert models[0]["backend"] == fleet.backend
    assert all(w["running_sequences"] == 0 and w["waiting_sequences"] == 0 for w in workers)
    if fleet.backend == "vllm":
        assert all(w["kv_cache_usage"] == 0.0 and w["revision"].endswith("+vllm") for w in workers)
    metrics = httpx.get(f"{fleet.base_url}/metrics").text
    assert "axion:worker_running_sequences{" in metrics


def test_stream_and_non_stream_give_the_same_greedy_text(fleet: Fleet) -> None:
    whole = greedy(fleet, "one line about the sea")
    pieces, usage = [], None
    for chunk in fleet.client().chat.completions.create(
            model=fleet.model, messages=[{"role": "user", "content": "one line about the sea"}], temperature=0,
            max_tokens=24, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        else:
            usage = chunk.usage
    assert whole.choices[0].message.content == "".join(pieces) != ""
    assert whole.choices[0].finish_reason == "length"
    assert usage is not None and whole.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, 24)


def test_n_seeded_choices_with_logprobs(fleet: Fleet) -> None:
    def ask() -> Any:
        return fleet.client().chat.completions.create(model=fleet.model, messages=ASK, n=3, temperature=0.9, seed=7,
                                                      max_tokens=8, logprobs=True, top_logprobs=2,
                                                      extra_body={"ignore_eos": True})

    first, again = ask(), ask()
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [c.message.content for c in again.choices]  # seed + index: reproducible
    for choice in first.choices:
        entries = choice.logprobs.content
        assert len(entries) == 8 and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)
        assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in entries)
        assert all(e.logprob <= e.top_logprobs[0].logprob + 1e-5 for e in entries)
    assert first.usage is not None and first.usage.completion_tokens == 24


def test_json_schema_output_validates(fleet: Fleet) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "mood": {"enum": ["calm", "rough"]}},
              "required": ["ok", "mood"]}
    resp = fleet.client().chat.completions.create(
        model=fleet.model, messages=ASK, max_tokens=40, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "sea", "strict": True, "schema": schema}})
    answer = json.loads(resp.choices[0].message.content)
    assert set(answer) == {"ok", "mood"} and isinstance(answer["ok"], bool) and answer["mood"] in ("calm", "rough")
    bad = httpx.post(f"{fleet.base_url}/v1/chat/completions", json={
        "model": fleet.model, "messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    for extra, valid in (({"guided_choice": ["calm", "rough"]}, "calm|rough"), ({"guided_regex": "[0-9]{2}-[a-z]"},
                         "[0-9]{2}-[a-z]"), ({"guided_grammar": 'root ::= "ok" | "no"'}, "ok|no")):
        text = greedy(fleet, "Sea?", 12, extra_body=extra).choices[0].message.content
        assert re.fullmatch(valid, text), (extra, text)


def test_a_forced_tool_call(fleet: Fleet) -> None:
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}}}}}
    resp = fleet.client().chat.completions.create(model=fleet.model, messages=ASK, tools=[tool], max_tokens=100,
                                                  seed=2, tool_choice="required", parallel_tool_calls=False)
    assert resp.choices[0].finish_reason == "tool_calls"
    (call,) = resp.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("utc", "cet")


def test_stop_string_ends_the_text_before_it(fleet: Fleet) -> None:
    text = greedy(fleet, "a stop test", tokens=24).choices[0].message.content
    stop = text[8:11]
    resp = greedy(fleet, "a stop test", tokens=24, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == text[:text.index(stop)]


def test_prompt_logprobs_match_the_models_logits(fleet: Fleet) -> None:
    ids = prompt_ids(fleet.model)
    expected, _ = reference(fleet.model, ids)
    resp = fleet.client().completions.create(model=fleet.model, prompt=ids, max_tokens=1, logprobs=1, echo=True,
                                             temperature=0, extra_body={"prompt_logprobs": 1})
    choice = resp.model_dump()["choices"][0]
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["token_logprobs"][1:len(ids)] == pytest.approx(expected, abs=2e-2)
    scores = choice["prompt_logprobs"]
    assert scores[0] is None and len(scores) == len(ids)
    assert [s[str(t)]["logprob"] for s, t in zip(scores[1:], ids[1:], strict=True)] == pytest.approx(expected,
                                                                                                    abs=2e-2)


def _body(fleet: Fleet, i: int, tokens: int, stream: bool = True) -> dict[str, Any]:
    return {"model": fleet.model, "messages": [{"role": "user", "content": f"contract request {i}"}],
            "temperature": 0, "max_tokens": tokens, "ignore_eos": True, "stream": stream}


def _wait_idle(fleet: Fleet, within_s: float) -> list[tuple[int, int]]:
    """Wait until no worker has a sequence in flight; return (active, engine running) per worker."""
    deadline = time.monotonic() + within_s
    while True:
        states = [(w["active_sequences"], w["running_sequences"]) for w in fleet.chat_workers()]
        if not any(a or r for a, r in states) or time.monotonic() > deadline:
            return states
        time.sleep(0.1)


def test_clients_that_leave_stop_the_engine(fleet: Fleet) -> None:
    fleet.ensure_two_workers()

    async def go() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            firsts = [asyncio.Event() for _ in range(8)]
            await asyncio.gather(*(_stream(http, fleet.base_url, _body(fleet, 100 + i, 900), firsts[i], True)
                                   for i in range(8)))

    asyncio.run(go())
    assert _wait_idle(fleet, 3.0) == [(0, 0), (0, 0)]  # the engine's own running count too, one beat later
    r = redis.Redis.from_url(fleet.redis.url)
    stream = keys.chat_stream(fleet.model)
    deadline = time.monotonic() + 10  # jobs queued behind the others may be read only now, then dropped and acked
    while (pending := r.xpending_range(stream, keys.WORKER_GROUP, "-", "+", 100)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pending, (pending, [r.xrange(stream, p["message_id"], p["message_id"]) for p in pending])


def test_a_deadline_stops_the_request_in_time(fleet: Fleet) -> None:
    fleet.ensure_two_workers()
    started = time.monotonic()
    resp = httpx.post(f"{fleet.base_url}/v1/chat/completions", json=_body(fleet, 200, 900, stream=False),
                      headers={"X-Request-Timeout": "0.5"}, timeout=30)
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "timeout"
    assert time.monotonic() - started < 3
    assert _wait_idle(fleet, 3.0) == [(0, 0), (0, 0)]


def test_kill_9_mid_stream_loses_and_repeats_nothing(fleet: Fleet) -> None:
    fleet.ensure_two_workers()
    tokens = 160

    async def run(kill: bool) -> list[tuple[str, list[str], str | None]]:
        async with httpx.AsyncClient(timeout=120) as http:
            firsts = [asyncio.Event() for _ in range(8)]
            tasks = [asyncio.create_task(_stream(http, fleet.base_url, _body(fleet, 300 + i, tokens), firsts[i]))
                     for i in range(8)]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 60)
            if kill:
                victim.process.send_signal(signal.SIGKILL)
            return await asyncio.gather(*tasks)

    victim = fleet.workers[0]
    expected = asyncio.run(run(kill=False))
    engine = engine_processes(victim.process.pid)
    results = asyncio.run(run(kill=True))
    assert victim.process.wait(10) == -signal.SIGKILL
    assert [text for text, _, _ in results] == [text for text, _, _ in expected]
    assert all(text and finish == "length" for text, _, finish in results)
    assert "took over job" in fleet.workers[1].log()
    alive = gone(engine)  # vLLM's engine processes go with their worker
    assert not alive, [p.cmdline() for p in alive]


def test_hot_swap_loads_and_unloads_the_backend(fleet: Fleet) -> None:
    """Last here: one worker swaps its model for the same folder served as `swapped` on the same backend, then
    unloads it; the engine it ran before is gone from its process tree each time."""
    import subprocess
    import sys

    fleet.workers = [w for w in fleet.workers if w.process.poll() is None]  # no new worker: a vLLM start is ~40 s
    victim = fleet.workers[0]
    worker_id = next(w["id"] for w in fleet.chat_workers() if w["pid"] == victim.process.pid)

    def models(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "axion.cli", "models", *args, "--timeout", "240"],
                              env=fleet.env, capture_output=True, text=True, timeout=300)

    before = engine_processes(victim.process.pid)
    loaded = models("load", fleet.model, "--as", "swapped", "--worker", worker_id)
    assert loaded.returncode == 0, loaded.stderr + victim.log()[-3000:]
    swapped = next(w for w in fleet.chat_workers() if w["id"] == worker_id)
    assert (swapped["model"], swapped["backend"]) == ("swapped", fleet.backend)
    reply = fleet.client().chat.completions.create(model="swapped", messages=ASK, temperature=0, max_tokens=8)
    assert reply.choices[0].finish_reason == "length"
    alive = gone(before)  # the first engine's processes, if it had any
    assert not alive, [p.cmdline() for p in alive]
    during = engine_processes(victim.process.pid)
    unloaded = models("unload", "swapped")
    assert unloaded.returncode == 0, unloaded.stderr
    alive = gone(during)
    assert not alive, [p.cmdline() for p in alive]
