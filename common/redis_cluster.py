"""Redis Cluster: how a process learns it talks to one, and the few commands that differ there.

REDIS_CLUSTER=auto (the default) asks the node in REDIS_URL (`INFO`) at start: `cluster_enabled:1` means a
cluster, and the client then routes every command to the node that owns its key's slot. `true`/`false` skip the
question; `true` is for a deployment where Axion may start before Redis answers (auto then assumes a single
node).

What changes in a cluster, and where it is handled:
- Keys a Lua script, a transaction or a multi-key command touches together share a hash tag (`common/keys.py`),
  so they live in one slot. Plain pipelines may span nodes: redis-py splits them per node.
- Pub/sub is sharded (SPUBLISH/SSUBSCRIBE, Redis 7.0+): a request's events travel inside the shard that owns its
  channel instead of being broadcast to every node. On an older cluster plain PUBLISH is used, which every
  node forwards to every other. `publish` below picks; the API's subscriber side is `api/cluster_hub.py`.
- MGET needs all its keys in one slot: `mget` splits it per slot in a cluster.
- SCAN must visit every primary: redis-py's cluster `scan_iter` does.
- There are no database numbers: REDIS_URL may end in `/0` or nothing, any other number stops the process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import redis
from redis.asyncio.cluster import ClusterPipeline as AsyncClusterPipeline
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterPipeline, RedisCluster

log = logging.getLogger("axion.redis")

#: The first Redis version with sharded pub/sub.
SHARDED_PUBSUB_SINCE = (7, 0)
_CLUSTER_TYPES = (AsyncRedisCluster, RedisCluster)
_PIPELINE_TYPES = (AsyncClusterPipeline, ClusterPipeline)
#: Set on a cluster client whose servers predate sharded pub/sub; every other cluster client uses it.
_PLAIN_PUBSUB = "axion_plain_pubsub"


@dataclass(frozen=True)
class Topology:
    cluster: bool
    sharded_pubsub: bool  # meaningful in a cluster only


def probe(url: str, timeout_s: float) -> Topology | None:
    """Ask the node in `url` whether it is a cluster node and which version it runs; None when it does not
    answer. One short-lived connection, before the process's real client exists."""
    without_db = urlparse(url)._replace(path="").geturl()  # a cluster node refuses SELECT
    client = redis.Redis.from_url(without_db, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        info = client.info()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return None
    finally:
        client.close()
    return Topology(bool(info.get("cluster_enabled")), _version(str(info.get("redis_version", "0"))) >=
                    SHARDED_PUBSUB_SINCE)


def topology(url: str, mode: str, timeout_s: float) -> Topology:
    """What REDIS_CLUSTER (`mode`) and, for `auto`, the server say."""
    if mode == "false":
        return Topology(False, False)
    found = probe(url, timeout_s)
    if found is None:
        if mode == "true":
            return Topology(True, True)  # not reachable yet: assume a current server
        log.warning("REDIS_CLUSTER=auto: %s did not answer; assuming a single Redis node (set REDIS_CLUSTER=true "
                    "when Axion may start before a Redis Cluster does)", _redacted(url))
        return Topology(False, False)
    if mode == "true" and not found.cluster:
        raise SystemExit(f"axion: REDIS_CLUSTER=true but {_redacted(url)} is not a cluster node "
                         "(INFO cluster says cluster_enabled:0)")
    if found.cluster and urlparse(url).path.strip("/") not in ("", "0"):
        raise SystemExit(f"axion: {_redacted(url)} names a database, but a Redis Cluster has only database 0")
    return found


def mark(client: Any, found: Topology) -> Any:
    """Remember, for `publish`, whether a cluster client's servers have sharded pub/sub."""
    if found.cluster and not found.sharded_pubsub:
        setattr(client, _PLAIN_PUBSUB, True)
    return client


def is_cluster(target: Any) -> bool:
    """True for a cluster client or one of its pipelines (sync or asyncio)."""
    return isinstance(target, _CLUSTER_TYPES + _PIPELINE_TYPES)


def sharded(target: Any) -> bool:
    """Whether publishing through `target` (a client or pipeline) goes by SPUBLISH."""
    target = getattr(target, "cluster_client", target)  # an asyncio cluster pipeline's client
    return isinstance(target, _CLUSTER_TYPES) and not getattr(target, _PLAIN_PUBSUB, False)


def publish(target: Any, channel: str, message: bytes) -> Any:
    """PUBLISH, or SPUBLISH on a cluster that has it; returns what the command returns (a pipeline queues it and
    returns itself, so calls chain as before)."""
    if sharded(target):
        return target.spublish(channel, message)
    return target.publish(channel, message)


async def mget(client: Any, names: Sequence[str]) -> list[bytes | None]:
    """MGET, split per slot on a cluster (the keys of several workers live in several slots)."""
    if is_cluster(client):
        return await client.mget_nonatomic(list(names))
    return await client.mget(list(names))


def mget_sync(client: Any, names: Sequence[str]) -> list[bytes | None]:
    return client.mget_nonatomic(list(names)) if is_cluster(client) else client.mget(list(names))


def sync_client(url: str, mode: str = "auto", **kwargs: Any) -> redis.Redis | RedisCluster:
    """A blocking client for the operator commands (`axion status`, `axion keys`...), cluster-aware."""
    found = topology(url, mode, float(kwargs.get("socket_connect_timeout") or 5))
    if found.cluster:
        return mark(RedisCluster.from_url(url, **kwargs), found)
    return redis.Redis.from_url(url, **kwargs)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        parts.append(int(part) if part.isascii() and part.isdigit() else 0)
    return tuple(parts)


def _redacted(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def text(value: Any) -> str:
    """A reply redis-py types as `bytes | str | ...` (our clients return bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
