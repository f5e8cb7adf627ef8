"""Several models on one fleet, aliases, and hot swap, over real processes, real Redis and the openai SDK.

One API and two workers on their own Redis: worker 1 serves tiny model A (seed 0), worker 2 tiny model B
(seed 1), so their greedy outputs differ and each answer tells which model produced it. The hot-swap test runs
last: it swaps worker 2 from B to a third model C (seed 2) through the admin endpoint while a streaming request
to B runs, serves C, unloads it with `axion models unload`, and then C is a 404.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import httpx
import openai
import pytest

from common.redis_server import EmbeddedRedis, free_port
from tests.conftest import REPO, Proc, Server, axion_env, get_json, wait_ready

ADMIN_KEY = "axn-admin-test-key-0123456789"
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@dataclass
class Fleet:
    api: Server
    a: str  # model folders, which are also the served ids
    b: str
    c: str
    redis_url: str
    workers: list[Proc]
    env: dict[str, str]


@cache
def _model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def reference(path: str, max_tokens: int = 8) -> str:
    """Greedy `model.generate` on the chat template of MESSAGES."""
    import torch

    model, tok = _model(path)
    enc = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)


def tensor_bytes(path: str) -> int:
    model, _ = _model(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.fixture(scope="module")
def fleet(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from devtools.chat_models import build_tiny_llama

    models = tmp_path_factory.mktemp("fleet-models")
    a = str(tiny_model_dir)
    b, c = (str(build_tiny_llama(models / f"tiny-{seed}", seed=seed)) for seed in (1, 2))
    logs = tmp_path_factory.mktemp("models-fleet-logs")
    with EmbeddedRedis() as server:
        port = free_port()
        env = axion_env(tiny_model_dir, server.url, port, MAX_BATCH_SIZE="4", ADMIN_API_KEYS=ADMIN_KEY,
                        MODEL_ALIASES=f"gpt-4o-mini={a}, gpt-4.1-nano={b}", HEARTBEAT_TTL_S="3")
        workers = [Proc(["worker"], env | {"MODEL_NAME": model}, logs / f"worker-{i}.log").start()
                   for i, model in enumerate((a, b))]
        api = Proc(["api"], env, logs / "api.log").start()
        procs = [*workers, api]
        server_ = Server(f"http://127.0.0.1:{port}", a, procs, server.url)
        try:
            wait_ready(server_.base_url, procs, workers=2)
            yield Fleet(server_, a, b, c, server.url, workers, env)
        finally:
            codes = [proc.stop() for proc in procs]
            assert codes == [0, 0, 0], "\n".join(p.log()[-3000:] for p in procs)


def greedy(server: Server, model: str, max_tokens: int = 8) -> openai.types.chat.ChatCompletion:
    return server.client(timeout=60).chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                                             max_tokens=max_tokens)


def listed(server: Server) -> dict[str, dict]:
    return {m["id"]: m for m in get_json(f"{server.base_url}/v1/models")["data"]}


def test_two_workers_serve_two_models_each_request_reaches_its_own(fleet: Fleet) -> None:
    assert reference(fleet.a) != reference(fleet.b)  # the seeds make the two models answer differently
    for n in (6, 8):  # two lengths: the second request is not a response-cache hit
        assert greedy(fleet.api, fleet.a, n).choices[0].message.content == reference(fleet.a, n)
        assert greedy(fleet.api, fleet.b, n).choices[0].message.content == reference(fleet.b, n)
    # Each worker counted its own model's jobs (the counts arrive with the next heartbeat).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        workers = {w["model"]: w for w in get_json(f"{fleet.api.base_url}/health")["workers"]}
        if workers[fleet.a]["jobs_done"] >= 2 and workers[fleet.b]["jobs_done"] >= 2:
            break
        time.sleep(0.2)
    assert workers[fleet.a]["id"] != workers[fleet.b]["id"]
    assert workers[fleet.a]["jobs_done"] == workers[fleet.b]["jobs_done"] == 2


def test_models_lists_both_with_kind_backend_and_aliases(fleet: Fleet) -> None:
    models = fleet.api.client().models.list()
    cards = {m.id: m.model_dump() for m in models.data}
    assert set(cards) == {fleet.a, fleet.b, "gpt-4o-mini", "gpt-4.1-nano"}
    for model in (fleet.a, fleet.b):
        assert cards[model]["kind"] == "chat" and cards[model]["backend"] == "native"
        assert cards[model]["owned_by"] == "axion" and cards[model].get("root") is None
    assert cards["gpt-4o-mini"]["root"] == fleet.a and cards["gpt-4.1-nano"]["root"] == fleet.b
    for model in cards:  # the SDK's models.retrieve, slashes in the id included
        assert fleet.api.client().models.retrieve(model).model_dump() == cards[model]
    with pytest.raises(openai.NotFoundError) as missing:
        fleet.api.client().models.retrieve("org/not-served")
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_alias_resolves_before_cache_and_queue_and_is_echoed(fleet: Fleet) -> None:
    client = fleet.api.client(timeout=60)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4.1-nano", messages=MESSAGES,
                                                           temperature=0, max_tokens=9)
    answer = raw.parse()
    assert answer.model == "gpt-4.1-nano"  # the name the client sent comes back
    assert answer.choices[0].message.content == reference(fleet.b, 9)
    assert raw.headers["x-axion-cache"] == "miss"
    # The same request under the served id is a cache hit: the alias was resolved before the cache key.
    raw = client.chat.completions.with_raw_response.create(model=fleet.b, messages=MESSAGES, temperature=0,
                                                           max_tokens=9)
    assert raw.headers["x-axion-cache"] == "hit" and raw.parse().model == fleet.b
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=0,
                                                 max_tokens=8, stream=True))
    assert {c.model for c in chunks} == {"gpt-4o-mini"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference(fleet.a)
    with pytest.raises(openai.NotFoundError) as err:
        greedy(fleet.api, "gpt-5-unknown")
    assert err.value.body["code"] == "model_not_found"


def test_health_reports_memory_per_model(fleet: Fleet) -> None:
    health = get_json(f"{fleet.api.base_url}/health")
    for w in health["workers"]:
        assert w["memory"]["params_bytes"] == tensor_bytes(w["model"])
        assert w["memory"]["load_rss_delta_bytes"] > 0 and w["load_s"] > 0
    assert set(health["model_memory"]) == {fleet.a, fleet.b}
    assert health["model_memory"][fleet.b]["params_bytes"] == tensor_bytes(fleet.b)
    # The load showed its steps in the worker log.
    assert f"load {fleet.b} [3/3] warm-up forward pass" in fleet.workers[1].log()


def test_admin_endpoint_needs_the_admin_key(fleet: Fleet) -> None:
    url = f"{fleet.api.base_url}/admin/models/load"
    assert httpx.post(url, json={"model": fleet.c}).status_code == 401
    wrong = httpx.post(url, json={"model": fleet.c}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    # No idle worker and none named: refused, nothing sent.
    busy = httpx.post(url, json={"model": fleet.c}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "no_idle_worker"


def test_hot_swap_drains_in_flight_stream_then_serves_then_unloads(fleet: Fleet) -> None:
    api = fleet.api
    worker_b = next(w["id"] for w in get_json(f"{api.base_url}/health")["workers"] if w["model"] == fleet.b)
    # A long streaming request to B, running when the swap is ordered.
    streamed: dict[str, object] = {}
    first_chunk = threading.Event()

    def stream_b() -> None:
        text, finish, usage = "", None, None
        for chunk in api.client(timeout=120).chat.completions.create(
                model=fleet.b, messages=MESSAGES, temperature=0, max_tokens=400, stream=True,
                stream_options={"include_usage": True}):
            usage = chunk.usage or usage
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
                if chunk.choices[0].delta.content:
                    first_chunk.set()
        streamed.update(text=text, finish=finish, tokens=usage.completion_tokens if usage else None)

    reader = threading.Thread(target=stream_b)
    reader.start()
    assert first_chunk.wait(30)
    sent = httpx.post(f"{api.base_url}/admin/models/load", json={"model": fleet.c, "worker": worker_b},
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert sent.status_code == 202 and sent.json()["workers"] == [worker_b]
    reader.join(120)
    # The request to the old model was running when the swap began, and ran to its end on the old model.
    assert "then draining 1 in flight" in fleet.workers[1].log()
    assert streamed["finish"] == "length" and streamed["tokens"] == 400
    # B's own greedy start (a full 400-token reference would cost seconds; a cut-off character is dropped)
    assert str(streamed["text"]).startswith(reference(fleet.b, 40).rstrip("\ufffd"))

    deadline = time.monotonic() + 60
    while fleet.c not in (models := listed(api)) and time.monotonic() < deadline:
        assert set(models) <= {fleet.a, fleet.b, "gpt-4o-mini", "gpt-4.1-nano"}
        time.sleep(0.2)
    assert fleet.c in models and fleet.b not in models and "gpt-4.1-nano" not in models
    assert greedy(api, fleet.c).choices[0].message.content == reference(fleet.c)
    assert greedy(api, fleet.a).choices[0].message.content == reference(fleet.a)  # the other worker untouched
    with pytest.raises(openai.NotFoundError) as err:  # B was withdrawn from its last worker: unknown now
        greedy(api, fleet.b)
    assert err.value.body["code"] == "model_not_found"
    health = get_json(f"{api.base_url}/health")
    swapped = next(w for w in health["workers"] if w["id"] == worker_b)  # same process, same id, new model
    assert swapped["model"] == fleet.c and swapped["memory"]["params_bytes"] == tensor_bytes(fleet.c)

    unload = subprocess.run([sys.executable, "-m", "axion.cli", "models", "unload", fleet.c, "--timeout", "60"],
                            env=fleet.env, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert unload.returncode == 0, unload.stderr
    assert fleet.c not in listed(api)
    with pytest.raises(openai.NotFoundError) as err:
        greedy(api, fleet.c)
    assert err.value.body == {"message": f"The model '{fleet.c}' does not exist.", "type": "invalid_request_error",
                              "param": "model", "code": "model_not_found"}
    idle = subprocess.run([sys.executable, "-m", "axion.cli", "models", "list", "--json"], env=fleet.env, cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert f'"worker_id": "{worker_b}"' in idle.stdout and '"model": "(idle)"' in idle.stdout


def test_an_idle_chat_worker_loads_a_rerank_model(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> None:
    """After the unload above worker 2 is idle: `axion models load --kind rerank` (no --worker) picks it, and the
    same process now serves a cross-encoder on fastembed."""
    from devtools.embed_models import build_tiny_cross_encoder

    reranker = str(build_tiny_cross_encoder(tmp_path_factory.mktemp("fleet-rerank") / "cross-encoder"))
    load = subprocess.run([sys.executable, "-m", "axion.cli", "models", "load", reranker, "--kind", "rerank",
                           "--timeout", "60"], env=fleet.env, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert load.returncode == 0, load.stderr
    card = listed(fleet.api)[reranker]
    assert (card["kind"], card["backend"]) == ("rerank", "fastembed")
    answer = httpx.post(f"{fleet.api.base_url}/v1/rerank", timeout=30, json={
        "model": reranker, "query": "the sea", "documents": ["waves and salt", "a tax form"]}).json()
    assert sorted(r["index"] for r in answer["results"]) == [0, 1]
    worker = next(w for w in get_json(f"{fleet.api.base_url}/health")["workers"] if w["model"] == reranker)
    assert worker["id"] in load.stdout and worker["kind"] == "rerank"
