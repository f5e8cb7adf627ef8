"""The one way every Axion process opens its Redis client: bounded timeouts and a short retry.

redis-py's defaults retry a failed command 10 times with backoff and wait 5 s for a socket, so during an outage
each request would hang for seconds before failing. Here a command fails within about `REDIS_TIMEOUT_S`
(connect or read): a refused or reset connection is retried at most twice, quickly (enough for a pooled
connection the server closed), a timeout not at all (it already waited its bound). The API then answers 503;
the processes keep running and the next command reconnects by itself.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from common.settings import Settings

DEFAULT_URL = "redis://127.0.0.1:6379/0"
RETRIES = 2
RETRY_CAP_S = 0.1


def connect(settings: Settings, *, block_ms: int = 0) -> aioredis.Redis:
    """A client for REDIS_URL. `block_ms` is the longest BLOCK this process's commands use (XREADGROUP of a
    worker): the read timeout must outlast it, or every idle blocking read would count as an outage."""
    timeout = settings.redis_timeout_s
    return aioredis.from_url(
        settings.redis_url or DEFAULT_URL,
        socket_connect_timeout=timeout,
        socket_timeout=timeout + block_ms / 1000,
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=RETRY_CAP_S), RETRIES,
                    supported_errors=(RedisConnectionError,)),
        health_check_interval=30,
    )
