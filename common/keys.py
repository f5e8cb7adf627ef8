"""Every Redis key and channel name Axion uses, in one place.

Ops read these with `redis-cli`; the README lists them with the commands that inspect them. Each name is a
function of the thing it belongs to.

Redis Cluster: the part of a name in `{...}` (its hash tag) alone picks the slot, so keys used together share
one. A request's reply channel, progress lists and cancel flag are tagged with its id; a model's job stream
and dead-letter stream with the model id; a cache namespace's keys with the namespace; a cache lease and its
done channel with the cache key; a rate-limited key's two buckets with the key id. The fleet keys (worker index,
heartbeats, known models) are never used together in a script, so they stay untagged. A model's batch stream is
tagged like its job stream, a stored file's object and lines with the file id, a batch's hash with its id (the
file and batch indexes are untagged: the MULTI blocks that update an index with a file's keys would need one
slot in Cluster mode, which the Batch API does not support yet).
"""

from __future__ import annotations

PREFIX = "axion"

#: The one consumer group every worker of a model joins; entries are XACKed and XDELed once answered.
WORKER_GROUP = "workers"

#: Set of every model id a worker has ever announced: tells "no worker right now" (503) from "unknown" (404).
KNOWN_MODELS = f"{PREFIX}:models"

#: Set of model ids unloaded on purpose (`axion models unload`) with no worker left serving them: a request for
#: one is a 404 like an unknown model, not a 503. A worker that serves the model again removes it (every beat).
RETIRED_MODELS = f"{PREFIX}:models:retired"

#: Pattern matching every live worker's heartbeat key.
WORKER_HEARTBEAT_PATTERN = f"{PREFIX}:worker:*"

#: Sorted set of worker ids by the unix time of their last heartbeat: the API reads it (ZRANGE, then MGET of the
#: heartbeat keys) instead of SCANning the whole keyspace, which holds every cache entry too.
WORKER_INDEX = f"{PREFIX}:workers"


def chat_stream(model: str) -> str:
    """The stream of chat jobs for one served model id."""
    return job_stream("chat", model)


def embed_stream(model: str) -> str:
    """The stream of embedding jobs for one served embedding model id."""
    return job_stream("embed", model)


def rerank_stream(model: str) -> str:
    """The stream of rerank jobs for one served cross-encoder model id."""
    return job_stream("rerank", model)


def job_stream(kind: str, model: str) -> str:
    """The job stream of a worker kind (`chat`, `embed`, `rerank`) for one model id."""
    return f"{PREFIX}:{kind}:{{{model}}}:jobs"


def dead_letter_stream(kind: str, model: str) -> str:
    """Jobs of `kind` for `model` given up on (delivered too often without an answer); kept for inspection. In
    the job stream's slot: `axion dead-letters retry` moves an entry between the two in one transaction."""
    return f"{PREFIX}:{kind}:{{{model}}}:dead"


def reply_channel(request_id: str) -> str:
    """The pub/sub channel on which a request's events come back to the API replica that holds its client."""
    return f"{PREFIX}:reply:{{{request_id}}}"


def worker_heartbeat(worker_id: str) -> str:
    """A worker's self-description (JSON) under a short TTL; gone within the TTL after the worker dies."""
    return f"{PREFIX}:worker:{worker_id}"


def worker_control(worker_id: str) -> str:
    """A worker's control stream: `load` / `unload` commands (JSON field `command`), read in order, one at a
    time, so a command sent while the worker is busy waits instead of being lost. Not under `axion:worker:`,
    whose keys are all heartbeats."""
    return f"{PREFIX}:control:{worker_id}"


def _cache_slot(namespace: str) -> str:
    """Every key of a cache namespace shares one hash tag, so its Lua scripts stay in one Redis Cluster slot."""
    return f"{PREFIX}:cache:{{{namespace}}}"


def cache_entry_prefix(namespace: str) -> str:
    """Entries of a cache namespace are `<prefix><member>` strings (member = the request's SHA-256)."""
    return f"{_cache_slot(namespace)}:entry:"


def cache_ranking(namespace: str) -> str:
    """Sorted set of a namespace's members by last use (lowest score = least recently used = evicted first)."""
    return f"{_cache_slot(namespace)}:lru"


def cache_clock(namespace: str) -> str:
    """Counter that ranks uses across all API replicas."""
    return f"{_cache_slot(namespace)}:clock"


def cache_stats(namespace: str) -> str:
    """Hash with the namespace's `hits` and `misses`, summed over all replicas."""
    return f"{_cache_slot(namespace)}:stats"


def cache_lease(key: str) -> str:
    """Single-flight lease on a chat cache key: held (with a TTL) by the request that generates the answer."""
    return f"{PREFIX}:cache:lease:{{{key}}}"


def cache_done_channel(key: str) -> str:
    """Pub/sub channel on which a lease holder says it is done, so waiting requests read the cache."""
    return f"{PREFIX}:cache:done:{{{key}}}"


def cancel_flag(request_id: str) -> str:
    """Set (with a TTL) by the API when a request's client went away or timed out; workers drop the job."""
    return f"{PREFIX}:cancel:{{{request_id}}}"


def response(response_id: str) -> str:
    """A stored Responses API answer and the conversation it ended (JSON, with RESPONSE_STORE_TTL_S): read by
    every API replica for `previous_response_id` and `GET /v1/responses/{id}`."""
    return f"{PREFIX}:response:{{{response_id}}}"


def progress(request_id: str, index: int) -> str:
    """List of the token ids choice `index` of a request has generated so far (short-lived): a worker that
    reclaims the job from a crashed one resumes from them instead of starting over."""
    return f"{PREFIX}:progress:{{{request_id}}}:{index}"


def engine_progress(request_id: str, index: int) -> str:
    """List of how many characters of choice `index` a worker on an external engine had published after each
    event (engines stream text, not token ids): a worker that reclaims the job reruns it and skips that much."""
    return f"{PREFIX}:engine-progress:{request_id}:{index}"


#: Hash of the API keys `axion keys` manages: field = SHA-256 hex of the key, value = its JSON record
#: (`common/apikeys.py`). The key itself is never stored.
API_KEYS = f"{PREFIX}:apikeys"


def rate_limit_bucket(key_id: str, dimension: str) -> str:
    """One key's token bucket for `requests` or `tokens` per minute (a hash: level, ts), shared by every replica."""
    return f"{PREFIX}:ratelimit:{{{key_id}}}:{dimension}"


# ---- Batch API (README "Batch API"; `batches/`) ---------------------------------------------------------------

#: The rq queue batch jobs go on (rq keeps it under `rq:queue:axion-batches`; `rq info` shows it).
BATCH_QUEUE = "axion-batches"

#: Who files and batches belong to when API keys are off: every caller (the principal id of api/auth.py).
ANONYMOUS_OWNER = "anonymous"

#: Sorted set of the file ids of callers without a key (API keys off), by creation time (their /v1/files).
FILES_INDEX = f"{PREFIX}:files"

#: Sorted set of the batch ids of callers without a key, by creation time (their /v1/batches, newest first).
BATCHES_INDEX = f"{PREFIX}:batches"


def files_index(owner: str) -> str:
    """One owner's files by creation time: each API key (by id) lists only its own; keys off, the one index."""
    return FILES_INDEX if owner == ANONYMOUS_OWNER else f"{FILES_INDEX}:{{{owner}}}"


def batches_index(owner: str) -> str:
    """One owner's batches by creation time, as `files_index`."""
    return BATCHES_INDEX if owner == ANONYMOUS_OWNER else f"{BATCHES_INDEX}:{{{owner}}}"


def batch_stream(kind: str, model: str) -> str:
    """The low-priority stream of batch lines for one model: workers take from it only slots the online stream
    (`job_stream`) leaves free."""
    return f"{PREFIX}:{kind}:{{{model}}}:batch"


def file_meta(file_id: str) -> str:
    """A stored file's OpenAI `file` object (JSON)."""
    return f"{PREFIX}:file:{{{file_id}}}"


def file_owner(file_id: str) -> str:
    """The id of the API key that owns a stored file (absent: `ANONYMOUS_OWNER`); batch outputs get their batch's."""
    return f"{PREFIX}:file:{{{file_id}}}:owner"


def file_lines(file_id: str) -> str:
    """A stored file's content as a list of JSONL lines (no newlines): batch outputs are appended line by line."""
    return f"{PREFIX}:file:{{{file_id}}}:lines"


def batch(batch_id: str) -> str:
    """A batch's state (hash): status, timestamps, request counts, file ids; one field per value so the runner's
    counters and a cancel never overwrite each other."""
    return f"{PREFIX}:batch:{{{batch_id}}}"
