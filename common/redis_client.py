"""The one way every Axion process opens its Redis client: bounded timeouts and a short retry.

redis-py's defaults retry a failed command 10 times with backoff and wait 5 s for a socket, so during an outage
each request would hang for seconds before failing. Here a command fails within about `REDIS_TIMEOUT_S`
(connect or read): a refused or reset connection is retried at most twice, quickly (enough for a pooled
connection the server closed), a timeout not at all (it already waited its bound). The API then answers 503;
the processes keep running and the next command reconnects by itself.

Against a Redis Cluster (REDIS_CLUSTER, see `common/redis_cluster.py`) the same bounds hold for every node's
connections, and the client is redis-py's cluster client, which routes each command to its slot's node.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from common import aio, redis_cluster
from common.settings import Settings

DEFAULT_URL = "redis://127.0.0.1:6379/0"
RETRIES = 2
RETRY_CAP_S = 0.1
POOL_SPARE = 32


def connect(settings: Settings, *, block_ms: int = 0) -> aioredis.Redis:
    """A client for REDIS_URL (a cluster client when it names a cluster node). `block_ms` is the longest BLOCK
    this process's commands use (XREADGROUP of a worker): the read timeout must outlast it, or every idle
    blocking read would count as an outage."""
    aio.backport_wait_for()  # else a task cancelled while it sends a command may run on (Python 3.11)
    url = settings.redis_url or DEFAULT_URL
    found = redis_cluster.topology(url, settings.redis_cluster, settings.redis_timeout_s)
    options = _options(settings, block_ms)
    if found.cluster:
        return redis_cluster.mark(RedisCluster.from_url(url, **options), found)
    # redis-py's asyncio pool holds 100 connections by default and fails the 101st command at once
    # (MaxConnectionsError), which a burst of streams reaches. Each open
    # request uses at most one connection at a time, so the pool allows MAX_CONNECTIONS of them plus the
    # process's own (reply hub, heartbeats, health), and a command that finds none free waits up to
    # REDIS_TIMEOUT_S for one instead of failing.
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=settings.max_connections + POOL_SPARE,
                                                    timeout=settings.redis_timeout_s, **options)
    return aioredis.Redis.from_pool(pool)


def connect_node(settings: Settings, host: str, port: int, template: dict[str, Any]) -> aioredis.Redis:
    """A plain client for one cluster node (the API's sharded pub/sub connection to that shard), with the
    credentials and TLS of the cluster client's own connections to it (`template`)."""
    aio.backport_wait_for()
    kwargs = {**template, **_options(settings, 0), "host": host, "port": port}
    connection_class = kwargs.pop("connection_class", None)
    pool = aioredis.ConnectionPool(**({"connection_class": connection_class} if connection_class else {}), **kwargs)
    return aioredis.Redis(connection_pool=pool)


def _options(settings: Settings, block_ms: int) -> dict[str, Any]:
    timeout = settings.redis_timeout_s
    return {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout + block_ms / 1000,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=RETRY_CAP_S), RETRIES,
                       supported_errors=(RedisConnectionError,)),
        "health_check_interval": 30,
    }
