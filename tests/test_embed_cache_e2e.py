"""The embedding cache end to end: real Redis, one `axion worker` (all-MiniLM-L6-v2 as ONNX, fastembed) and two
`axion api` processes, one with the cache on (default) and one with EMBED_CACHE_CAPACITY=0, driven by the
official openai SDK. What the worker computed is read from its heartbeat in /health (`computed_items`), and
whether a job was queued at all from the stream's entries-added counter."""

from __future__ import annotations

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
from tests.conftest import Proc, Server, axion_env, get_json, wait_ready
from workers.embed.backends import load_embedding

NO_STORE = {"Cache-Control": "no-store"}


@pytest.fixture(scope="module")
def servers(minilm_onnx: Path, redis_server: EmbeddedRedis,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """(cache on, cache off): two API processes in front of one embedding worker on one Redis."""
    logs = tmp_path_factory.mktemp("embed-cache-logs")
    ports = [free_port(), free_port()]
    common = {"EMBEDDING_MODEL": str(minilm_onnx), "HEARTBEAT_TTL_S": "1.5",  # heartbeats every 0.5 s
              "VISIBILITY_TIMEOUT_S": "2"}
    procs = [Proc(["worker"], axion_env(minilm_onnx, redis_server.url, ports[0], WORKER_KIND="embed", **common),
                  logs / "worker.log").start(),
             Proc(["api"], axion_env(minilm_onnx, redis_server.url, ports[0], **common), logs / "api-on.log").start(),
             Proc(["api"], axion_env(minilm_onnx, redis_server.url, ports[1], EMBED_CACHE_CAPACITY="0", **common),
                  logs / "api-off.log").start()]
    pair = tuple(Server(f"http://127.0.0.1:{port}", str(minilm_onnx), procs, redis_server.url) for port in ports)
    try:
        for server in pair:
            wait_ready(server.base_url, procs, workers=1)
        yield pair  # type: ignore[misc]
    finally:
        codes = [proc.stop() for proc in procs]
        assert codes == [0, 0, 0], "\n".join(p.log()[-2000:] for p in procs)


@pytest.fixture(scope="module")
def on(servers: tuple[Server, Server]) -> Server:
    return servers[0]


def embed(server: Server, inputs: Any, headers: dict[str, str] | None = None,
          **kwargs: Any) -> tuple[str, openai.types.CreateEmbeddingResponse]:
    """(x-axion-cache, response) through the official SDK."""
    raw = server.client().embeddings.with_raw_response.create(model=server.model, input=inputs,
                                                              encoding_format="float", extra_headers=headers,
                                                              **kwargs)
    return raw.headers["x-axion-cache"], raw.parse()


def vectors(resp: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    return np.array([d.embedding for d in resp.data], dtype=np.float32)


def computed(server: Server) -> int:
    (worker,) = [w for w in get_json(f"{server.base_url}/health")["workers"] if w["kind"] == "embed"]
    return int(worker["computed_items"])


def settled(server: Server) -> int:
    """`computed` once every earlier request shows: a heartbeat (0.5 s) and the API's registry cache (0.5 s)."""
    time.sleep(1.2)
    return computed(server)


def computed_since(server: Server, before: int, expected: int, timeout: float = 10.0) -> int:
    """Inputs the worker computed since `before`, once its heartbeat (and the API's registry) show `expected`
    more, or at the timeout. One request is one job and one model call, so the count moves in a single step."""
    deadline = time.monotonic() + timeout
    while (now := computed(server)) - before < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return now - before


def jobs_queued(server: Server) -> int:
    r = redis.Redis.from_url(server.redis_url)
    return int(r.xinfo_stream(keys.embed_stream(server.model))["entries-added"])


def embed_stats(server: Server) -> dict[str, int]:
    return get_json(f"{server.base_url}/health")["cache"]["embed"]


def test_partial_hit_computes_only_the_missing_inputs(on: Server, minilm_onnx: Path) -> None:
    first_inputs = ["Cached one: a man plays a guitar.", "Cached two: the stock market fell."]
    base = settled(on)
    header, first = embed(on, first_inputs)
    assert header == "miss" and computed_since(on, base, 2) == 2

    mixed = ["New one: cats sleep all day.", first_inputs[0], "New two: a kitten naps.", first_inputs[1],
             "New one: cats sleep all day."]
    base = computed(on)
    header, second = embed(on, mixed)
    assert header == "miss"
    assert computed_since(on, base, 2) == 2  # the two new texts, the repeated one once; the cached ones not
    assert [d.index for d in second.data] == list(range(5))
    got = vectors(second)
    assert np.array_equal(got[1], vectors(first)[0]) and np.array_equal(got[3], vectors(first)[1])
    assert np.array_equal(got[0], got[4])
    reference = load_embedding(str(minilm_onnx))
    assert np.allclose(got, reference.embed(mixed), atol=1e-5)  # cached and computed rows are the same vectors
    assert second.usage.prompt_tokens == sum(reference.count_tokens(mixed))  # a hit still reports its tokens

    queued = jobs_queued(on)
    header, third = embed(on, mixed)
    assert header == "hit" and jobs_queued(on) == queued  # served from the cache: no job at all
    assert np.array_equal(vectors(third), got)
    assert third.usage.prompt_tokens == second.usage.prompt_tokens
    _, fresh = embed(on, mixed, NO_STORE)  # computed again, the cache untouched
    assert np.allclose(vectors(fresh), got, atol=1e-6)


def test_token_id_inputs_and_base64_are_cached_too(on: Server) -> None:
    ids = [[101, 1037, 3899, 102], [101, 2417, 2003, 102]]
    assert embed(on, ids)[0] == "miss"
    header, again = embed(on, ids)
    assert header == "hit" and len(again.data) == 2
    default = on.client().embeddings.with_raw_response.create(model=on.model, input=ids)  # the SDK asks base64
    assert default.headers["x-axion-cache"] == "hit"
    assert np.array_equal(np.array([d.embedding for d in default.parse().data], dtype=np.float32), vectors(again))


def test_dimensions_are_part_of_the_key(on: Server) -> None:
    text = "Dimensions: a ship sails at night."
    base = settled(on)
    assert embed(on, text)[0] == "miss" and computed_since(on, base, 1) == 1
    base += 1
    header, short = embed(on, text, dimensions=64)
    assert header == "miss" and len(short.data[0].embedding) == 64 and computed_since(on, base, 1) == 1
    header, again = embed(on, text, dimensions=64)
    assert header == "hit" and np.array_equal(vectors(again), vectors(short))
    assert len(embed(on, text)[1].data[0].embedding) == 384


def test_cache_control(on: Server) -> None:
    text = "Cache-Control: the moon is bright."
    embed(on, text)
    stats, queued = embed_stats(on), jobs_queued(on)
    header, _ = embed(on, text, NO_STORE)
    assert header == "bypass" and jobs_queued(on) == queued + 1
    assert embed_stats(on) == stats  # not read (no hit or miss counted), not written

    fresh = "Cache-Control: no-cache still stores."
    assert embed(on, fresh, {"Cache-Control": "no-cache"})[0] == "bypass"
    assert embed(on, fresh)[0] == "hit"
    assert embed(on, "Cache-Control: never stored.", NO_STORE)[0] == "bypass"
    assert embed(on, "Cache-Control: never stored.")[0] == "miss"


def test_capacity_zero_turns_the_cache_off(servers: tuple[Server, Server]) -> None:
    on, off = servers
    text = "Capacity zero: rain is falling."
    embed(on, text)
    assert embed(on, text)[0] == "hit"
    queued = jobs_queued(off)
    header, resp = embed(off, text)
    assert header == "bypass" and jobs_queued(off) == queued + 1 and len(resp.data[0].embedding) == 384
    assert embed_stats(off)["capacity"] == 0


def test_hit_and_miss_counts_in_health(on: Server) -> None:
    cached = ["Counts: one.", "Counts: two."]
    embed(on, cached)
    before = embed_stats(on)
    embed(on, [*cached, "Counts: three."])
    after = embed_stats(on)
    assert after["hits"] - before["hits"] == 2 and after["misses"] - before["misses"] == 1
    assert after["entries"] == before["entries"] + 1 and after["capacity"] == 100_000
    assert get_json(f"{on.base_url}/health")["cache"]["chat"]["capacity"] == 1000


def test_errors_name_the_clients_index_and_unknown_models_still_404(on: Server) -> None:
    text = "Errors: a cached input first."
    embed(on, text)
    with pytest.raises(openai.BadRequestError) as info:
        embed(on, [text, "word " * 400])  # only the second input goes to the worker, as its input 0
    assert info.value.body["param"] == "input[1]" and "Input 1 " in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        on.client().embeddings.create(model="no-such-model", input=text)


def test_an_embedding_job_left_by_a_dead_worker_is_taken_over(on: Server, minilm_onnx: Path) -> None:
    """A job a 'ghost' consumer read and never answered: the live worker takes it over and answers it."""
    import time

    import redis as sync_redis

    from common import keys
    from common.protocol import EmbedJob
    from tests.conftest import enqueue_orphan, next_event, subscribed

    r = sync_redis.Redis.from_url(on.redis_url)
    stream = keys.embed_stream(str(minilm_onnx))
    job = EmbedJob(request_id="orphan-embed-1", model=str(minilm_onnx), texts=["left behind by a crash"],
                   created=time.time())
    pubsub = subscribed(r, job.request_id)
    enqueue_orphan(r, stream, job)
    answer = next_event(pubsub)
    assert answer is not None, "the orphaned job was never answered"
    assert type(answer).__name__ == "Embedded" and answer.dim == 384
    assert r.xpending(stream, keys.WORKER_GROUP)["pending"] == 0
