"""Every Redis key and channel name Axion uses, in one place.

Ops read these with `redis-cli`; the README lists them with the commands that inspect them. Keep each name a
function of the thing it belongs to so a future move to Redis Cluster hash tags touches this module only.
"""

from __future__ import annotations

PREFIX = "axion"

#: The one consumer group every worker of a model joins; entries are XACKed and XDELed once answered.
WORKER_GROUP = "workers"

#: Set of every model id a worker has ever announced: tells "no worker right now" (503) from "unknown" (404).
KNOWN_MODELS = f"{PREFIX}:models"

#: Pattern matching every live worker's heartbeat key.
WORKER_HEARTBEAT_PATTERN = f"{PREFIX}:worker:*"


def chat_stream(model: str) -> str:
    """The stream of chat jobs for one served model id."""
    return f"{PREFIX}:chat:{model}:jobs"


def embed_stream(model: str) -> str:
    """The stream of embedding jobs for one served embedding model id."""
    return f"{PREFIX}:embed:{model}:jobs"


def rerank_stream(model: str) -> str:
    """The stream of rerank jobs for one served cross-encoder model id."""
    return f"{PREFIX}:rerank:{model}:jobs"


def reply_channel(request_id: str) -> str:
    """The pub/sub channel on which a request's events come back to the API replica that holds its client."""
    return f"{PREFIX}:reply:{request_id}"


def worker_heartbeat(worker_id: str) -> str:
    """A worker's self-description (JSON) under a short TTL; gone within the TTL after the worker dies."""
    return f"{PREFIX}:worker:{worker_id}"


#: Hash of the API keys `axion keys` manages: field = SHA-256 hex of the key, value = its JSON record
#: (`common/apikeys.py`). The key itself is never stored.
API_KEYS = f"{PREFIX}:apikeys"


def rate_limit_bucket(key_id: str, dimension: str) -> str:
    """One key's token bucket for `requests` or `tokens` per minute (a hash: level, ts), shared by every replica."""
    return f"{PREFIX}:ratelimit:{key_id}:{dimension}"
