"""The external-engine backend with another Axion as the engine: attached by EXTERNAL_ENGINE_URL (the session's
`served`), and spawned by EXTERNAL_ENGINE_CMD (an `axion serve` child with its own embedded Redis, so the
restart, shutdown and fallback paths run on a real process tree: guard → engine → its workers and Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest
import redis

from common import keys
from common.protocol import Accepted, ChatJob, ChatMessage, Delta, Failed, Finished, SamplingParams
from common.redis_server import EmbeddedRedis, free_port
from common.settings import load_settings
from tests.conftest import Proc, Server, axion_env, enqueue_orphan, get_json, next_event, subscribed
from tests.engine_helpers import (
    chat_worker_info,
    engine_tree,
    guards,
    kill_9_worker_and_check_nothing_left,
    start_front,
    wait_backend,
    wait_engine_started,
    wait_gone,
)
from workers.chat.choice import choose_backend
from workers.chat.external import guard as guard_module

MESSAGES = [{"role": "user", "content": "Write one line about the sea."}]
# Another Axion as a spawned engine: REDIS_URL dropped so it starts its own Redis (it must not join our stream).
AXION_ENGINE_CMD = (f"env -u REDIS_URL SERVER_HOST={{host}} SERVER_PORT={{port}} MODEL_NAME={{model}} "
                    f"SERVE_EMBEDDINGS=false MAX_SEQ_LEN=1024 {sys.executable} -m axion.cli serve")


def greedy(server: Server, max_tokens: int = 24, timeout: float | None = None,
           **extra: object) -> openai.types.chat.ChatCompletion:
    client = server.client(**({"timeout": timeout} if timeout else {}))
    return client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0,
                                          max_tokens=max_tokens, **extra)


@pytest.fixture(scope="module")
def attached(served: Server, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A front whose chat worker forwards to the session's `served` Axion by URL."""
    front = start_front(tiny_model_dir, tmp_path_factory.mktemp("attached"), "front",
                        EXTERNAL_ENGINE_URL=served.base_url, EXTERNAL_ENGINE_LACKS="n",
                        EXTERNAL_ENGINE_UNSUPPORTED="native")
    yield front
    assert front.procs[0].stop() == 0, front.procs[0].log()[-3000:]


@pytest.fixture(scope="module")
def spawned(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A front that spawns its own engine (another `axion serve`) from EXTERNAL_ENGINE_CMD."""
    front = start_front(tiny_model_dir, tmp_path_factory.mktemp("spawned"), "front", BACKEND="external",
                        EXTERNAL_ENGINE_CMD=AXION_ENGINE_CMD, EXTERNAL_ENGINE_START_TIMEOUT_S="120")
    yield front
    front.procs[0].stop()


def test_attached_engine_answers_through_our_stream(attached: Server, served: Server) -> None:
    info = chat_worker_info(attached)
    assert info["backend"] == "external" and "EXTERNAL_ENGINE_URL" in info["backend_reason"]
    models = get_json(f"{attached.base_url}/v1/models")["data"]
    assert models[0]["backend"] == "external" and "EXTERNAL_ENGINE_URL" in models[0]["backend_reason"]
    ours, theirs = greedy(attached), greedy(served)
    assert ours.choices[0].message.content == theirs.choices[0].message.content != ""
    assert ours.usage is not None and theirs.usage is not None
    assert (ours.usage.prompt_tokens, ours.usage.completion_tokens) == (theirs.usage.prompt_tokens, 24)
    assert ours.choices[0].finish_reason == "length"
    assert not ours.id.startswith(theirs.id)  # our own response, not the engine's passed through


def test_attached_streaming_and_usage_chunk(attached: Server, served: Server) -> None:
    chunks = list(attached.client().chat.completions.create(
        model=attached.model, messages=MESSAGES, temperature=0, max_tokens=20, stream=True))
    assert all(c.usage is None for c in chunks)  # per-chunk usage dropped: nobody asked for it
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(served, 20).choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    with_usage = list(attached.client().chat.completions.create(
        model=attached.model, messages=MESSAGES, temperature=0, max_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 5


def test_attached_engine_errors_come_back_as_openai_errors(attached: Server) -> None:
    with pytest.raises(openai.BadRequestError) as err:  # the engine's own 400, in our envelope
        attached.client().chat.completions.create(model=attached.model, messages=MESSAGES, max_tokens=5,
                                                  logit_bias={"999999": 5})
    assert err.value.status_code == 400 and err.value.body["param"] == "logit_bias"


def _engine_outcome(served: Server, client_id: str, timeout: float = 10) -> str:
    """How the engine (another Axion) logged the request we forwarded for `client_id` (our request id, which
    leads the engine's own): 'done ...' when it generated to the end, 'client went away' when we aborted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in served.procs[0].log().splitlines():
            if f"request {client_id}." in line and "stream=True" in line:
                return line.split("stream=True ", 1)[1]
        time.sleep(0.2)
    pytest.fail(f"the engine logged no request for {client_id}")


def _leave_after_3_chunks(attached: Server, request_id: str) -> None:
    stream = attached.client().chat.completions.create(model=attached.model, messages=MESSAGES, max_tokens=900,
                                                       stream=True, extra_body={"ignore_eos": True},
                                                       extra_headers={"X-Request-Id": request_id})
    for n, _chunk in enumerate(stream):
        if n == 3:
            break
    stream.close()


def _time_out(attached: Server, request_id: str) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        attached.client().chat.completions.create(model=attached.model, messages=MESSAGES, max_tokens=900,
                                                  extra_body={"ignore_eos": True},
                                                  extra_headers={"X-Request-Timeout": "0.5",
                                                                 "X-Request-Id": request_id})
    assert err.value.status_code == 504


@pytest.mark.parametrize("leave", [_leave_after_3_chunks, _time_out], ids=["client-leaves", "deadline"])
def test_a_client_that_leaves_or_times_out_stops_the_engine(attached: Server, served: Server, leave) -> None:
    """Cancel flag and deadline: our worker closes its upstream request, so the engine stops generating.
    The tiny engine writes 900 tokens in about 2 s, so on a loaded machine the abort can come after the engine
    has finished; up to three tries, each with the engine's own log as the judge."""
    outcomes, ids = [], []
    for attempt in range(3):
        ids.append(request_id := f"engine-{leave.__name__.strip('_')}-{attempt}")
        leave(attached, request_id)
        outcomes.append(_engine_outcome(served, request_id))
        if outcomes[-1].startswith("client went away"):
            return
    ours = [line for line in attached.procs[0].log().splitlines() if any(i in line for i in ids)]
    theirs = [line for line in served.procs[0].log().splitlines() if any(i in line for i in ids)]
    pytest.fail(f"the engine generated to the end every time: {outcomes}\nour log:\n" + "\n".join(ours)
                + "\nthe engine's log:\n" + "\n".join(theirs))


class Proxy:
    """A TCP forwarder in front of the `served` engine, on a thread of its own: `close` drops the listener and
    every open connection, which is the engine becoming unreachable; `open` brings it back on the same port."""

    def __init__(self, target: str) -> None:
        self.target_host, self.target_port = target.rsplit("/", 1)[-1].split(":")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    def open(self) -> None:
        async def start() -> None:
            self.server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port, reuse_address=True)
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def close(self) -> None:
        async def stop() -> None:
            assert self.server is not None
            self.server.close()
            for writer in list(self.writers):
                writer.close()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.target_host, int(self.target_port))
        self.writers |= {writer, up_writer}

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        self.writers -= {writer, up_writer}


def test_an_attached_engine_that_stops_answering_stops_the_worker_reading(
        served: Server, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The engine at EXTERNAL_ENGINE_URL goes away: the worker says so in /health and reads no job, so a request
    waits in the stream (for another worker, or this one) instead of failing; it is answered once the engine is
    back."""
    proxy = Proxy(served.base_url)
    proxy.open()
    front = start_front(tiny_model_dir, tmp_path_factory.mktemp("proxied"), "front", EXTERNAL_ENGINE_URL=proxy.url,
                        HEARTBEAT_TTL_S="1.5", CACHE_CAPACITY="0")
    try:
        expected = greedy(served, 8).choices[0].message.content
        assert greedy(front, 8).choices[0].message.content == expected
        proxy.close()
        try:  # read before the first failed health check (~1 s away): its connection is refused, and that alone
            greedy(front, 8, timeout=5)  # marks the engine down, before the 502 goes out
            refused: Exception | None = None
        except openai.APIStatusError as exc:
            refused = exc
        except openai.APITimeoutError:  # the health check got there first on a slow machine: the job waits
            refused = None
        if refused is not None:
            assert isinstance(refused, openai.APIStatusError) and refused.status_code == 502, refused
            assert "refused a connection; reading no job" in front.procs[0].log()
        wait_backend(front, "engine unreachable", timeout=30)
        answers: list[str | Exception | None] = []

        def ask() -> None:
            try:
                answers.append(greedy(front, 8).choices[0].message.content)
            except Exception as exc:  # shown by the assertions below
                answers.append(exc)

        waiting = threading.Thread(target=ask)
        waiting.start()
        time.sleep(2.0)
        assert waiting.is_alive() and not answers, f"the request did not wait for the engine: {answers}"
        proxy.open()
        waiting.join(60)
        assert answers == [expected]
        wait_backend(front, "engine ready", timeout=10)
        assert "answers again" in front.procs[0].log()
    finally:
        assert front.procs[0].stop() == 0, front.procs[0].log()[-3000:]
        with contextlib.suppress(Exception):
            proxy.close()


def test_what_the_engine_lacks_is_served_natively_when_asked(attached: Server, served: Server) -> None:
    """EXTERNAL_ENGINE_LACKS=n with EXTERNAL_ENGINE_UNSUPPORTED=native: n=2 runs on the worker's own model."""
    ours, theirs = greedy(attached, 8, n=2), greedy(served, 8, n=2)
    assert [c.message.content for c in ours.choices] == [c.message.content for c in theirs.choices]
    assert ours.usage is not None and ours.usage.completion_tokens == 16
    assert "loading" in attached.procs[0].log() and "natively for the requests its engine cannot serve" in (
        attached.procs[0].log())


def test_spawned_engine_restarts_after_a_crash_mid_request(spawned: Server, served: Server) -> None:
    front = spawned.procs[0].process.pid
    assert chat_worker_info(spawned)["backend"] == "external"
    assert greedy(spawned).choices[0].message.content == greedy(served).choices[0].message.content
    engine = next(p for p in engine_tree(front) if "axion.cli" in " ".join(p.cmdline()) and "serve" in p.cmdline())
    stream = spawned.client().chat.completions.create(model=spawned.model, messages=MESSAGES, temperature=0,
                                                      max_tokens=900, stream=True,
                                                      extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError) as err:
        for n, _chunk in enumerate(stream):
            if n == 3:
                engine.send_signal(signal.SIGKILL)
    assert "engine" in str(err.value)
    wait_backend(spawned, "1 restarts")
    wait_backend(spawned, "engine ready")
    assert greedy(spawned).choices[0].message.content == greedy(served).choices[0].message.content


def test_sigterm_of_the_front_leaves_no_engine_process(spawned: Server) -> None:
    tree = engine_tree(spawned.procs[0].process.pid)
    guard = guards(spawned.procs[0].process.pid)
    assert len(tree) >= 3  # the engine's serve, its api and worker (and its redis-server)
    assert spawned.procs[0].stop() == 0
    assert wait_gone(tree + guard) == []


def test_kill_9_of_the_worker_leaves_no_engine_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Killed while its engine starts (the engine's serve, Redis, API and worker already run): the guard, told
    by the parent-death signal, stops them all."""
    front = start_front(tiny_model_dir, tmp_path, "front", wait=False, BACKEND="external",
                        EXTERNAL_ENGINE_CMD=AXION_ENGINE_CMD, EXTERNAL_ENGINE_START_TIMEOUT_S="120")
    try:
        kill_9_worker_and_check_nothing_left(front.procs[0].process.pid, wait_engine_started(front, 4))
    finally:
        front.procs[0].stop()


def test_sigterm_while_the_engine_starts_stops_it_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An engine still starting has nothing to finish: `axion serve` stopped then exits without waiting out the
    guard's grace, even for an engine that ignores SIGTERM (as MAX does while it compiles)."""
    deaf = (f"{sys.executable} -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"time.sleep(600)' {{port}}")
    front = start_front(tiny_model_dir, tmp_path, "front", wait=False, BACKEND="external", EXTERNAL_ENGINE_CMD=deaf,
                        EXTERNAL_ENGINE_START_TIMEOUT_S="300")
    tree = wait_engine_started(front, 1)
    started = time.monotonic()
    assert front.procs[0].stop(timeout=60) == 0
    stopped_in = time.monotonic() - started
    print(f"stopped in {stopped_in:.1f}s")
    assert wait_gone(tree, timeout=5) == []
    assert stopped_in < guard_module.GRACE_S, f"stopped in {stopped_in:.1f}s:\n{front.procs[0].log()[-2000:]}"


def test_engine_that_never_gets_ready_falls_back_to_native(tiny_model_dir: Path, tmp_path: Path,
                                                           served: Server) -> None:
    never = f"{sys.executable} -c 'import time; time.sleep(600)' {{port}}"
    front = start_front(tiny_model_dir, tmp_path, "front", BACKEND="external", EXTERNAL_ENGINE_CMD=never,
                        EXTERNAL_ENGINE_START_TIMEOUT_S="3", timeout=60)
    try:
        info = chat_worker_info(front)
        assert info["backend"] == "native"
        assert "fallback: the engine was not ready within 3s" in info["backend_reason"]
        assert greedy(front).choices[0].message.content == greedy(served).choices[0].message.content
        sleepers = [p for p in psutil.process_iter(["cmdline"])
                    if "time.sleep(600)" in " ".join(p.info["cmdline"] or [])]
        assert wait_gone(sleepers, timeout=5) == []
    finally:
        assert front.procs[0].stop() == 0


def _model_dir(tmp_path: Path, architecture: str, model_type: str) -> Path:
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": model_type}))
    return folder


def test_backend_choice_and_its_reason(tmp_path: Path) -> None:
    """BACKEND=max spawns MAX only for an architecture on its list; auto takes vLLM on CUDA only (none here), an
    attached engine whenever EXTERNAL_ENGINE_URL is set, and the native engine otherwise."""
    fake_max = tmp_path / "bin" / "max"  # an installed `max` (its behaviour is the MAX tests' business)
    fake_max.parent.mkdir()
    fake_max.write_text("#!/bin/sh\n")
    fake_max.chmod(0o755)
    env = {"PATH": f"{fake_max.parent}{os.pathsep}{os.environ['PATH']}", "BACKEND": "max"}
    cmd = f"{fake_max} serve --model-path {{model}} --port {{port}}"
    llama = _model_dir(tmp_path, "LlamaForCausalLM", "llama")
    gpt2 = _model_dir(tmp_path, "GPT2LMHeadModel", "gpt2")

    def choice(**settings: str) -> tuple[str, str]:
        picked = choose_backend(load_settings(settings))
        return picked.backend, picked.reason

    assert choice(**env, MODEL_NAME=str(llama), EXTERNAL_ENGINE_CMD=cmd) == (
        "external", "BACKEND=max: architecture LlamaForCausalLM is supported by MAX")
    assert choice(**env, MODEL_NAME=str(gpt2), EXTERNAL_ENGINE_CMD=cmd) == (
        "native", "BACKEND=max: architecture GPT2LMHeadModel is not on MAX's list")
    missing = choice(MODEL_NAME=str(llama), BACKEND="max", EXTERNAL_ENGINE_CMD="no-such-engine x")
    assert missing[0] == "native" and "not installed" in missing[1]
    assert choice(MODEL_NAME=str(llama), DEVICE="cpu") == (
        "native", "BACKEND=auto: no CUDA device, the native engine serves CPUs")
    assert choice(MODEL_NAME=str(llama), EXTERNAL_ENGINE_URL="http://engine:8000/")[0] == "external"
    assert choice(MODEL_NAME=str(llama), BACKEND="native") == ("native", "BACKEND=native")
    backend, reason = choice(MODEL_NAME=str(gpt2), BACKEND="vllm", QUANTIZATION="int8")
    assert backend == "native" and reason.startswith("BACKEND=vllm, but ")


def test_a_job_taken_over_from_a_dead_worker_skips_what_was_published(served: Server, tiny_model_dir: Path,
                                                                       redis_server: EmbeddedRedis,
                                                                       tmp_path: Path) -> None:
    """A dead worker on the engine had published the first 12 characters (its progress list says so); the
    worker that takes the job over reruns it and publishes only the rest, numbered after them."""
    r = redis.Redis.from_url(redis_server.url)
    model, request_id = str(tiny_model_dir), "engine-takeover-1"
    stream = keys.chat_stream(model)
    with contextlib.suppress(redis.ResponseError):
        r.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
    full = greedy(served, 40).choices[0].message.content
    assert full is not None and len(full) > 12
    job = ChatJob(request_id=request_id, model=model, messages=[ChatMessage("user", MESSAGES[0]["content"])],
                  params=SamplingParams(temperature=0, max_tokens=40), created=time.time())
    r.rpush(keys.engine_progress(request_id, 0), 5, 12)
    pubsub = subscribed(r, request_id)
    enqueue_orphan(r, stream, job)
    worker = Proc(["worker"], axion_env(tiny_model_dir, redis_server.url, free_port(), BACKEND="auto",
                                        EXTERNAL_ENGINE_URL=served.base_url, VISIBILITY_TIMEOUT_S="1",
                                        HEARTBEAT_TTL_S="1.5", CACHE_CAPACITY="0"), tmp_path / "worker.log").start()
    try:
        events = [next_event(pubsub, timeout=60)]
        while not isinstance(events[-1], Finished | Failed | type(None)):
            events.append(next_event(pubsub))
        assert isinstance(events[0], Accepted), worker.log()[-3000:]
        deltas = [e for e in events if isinstance(e, Delta)]
        assert "".join(d.text for d in deltas) == full[12:]
        assert deltas[0].seq >= 12 and [d.seq for d in deltas] == sorted({d.seq for d in deltas})
        finished = events[-1]
        assert isinstance(finished, Finished) and finished.seq > deltas[-1].seq
        assert (finished.completion_tokens, finished.finish_reason) == (40, "length")
        time.sleep(0.2)
        assert r.xpending(stream, keys.WORKER_GROUP)["pending"] == 0
        assert not r.exists(keys.engine_progress(request_id, 0))
    finally:
        assert worker.stop() == 0
