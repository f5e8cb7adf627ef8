"""Putting a batch on the rq queue (`axion-batches`), and the worker process that drains it.

rq keeps the job's status, its retries and the failed-job registry in Redis, so `rq info --url $REDIS_URL`
shows the batch queue next to any other; the batch's own progress is in its hash (`batches/store.py`).
"""

from __future__ import annotations

import logging

import redis
from rq import Queue, Retry, Worker

from common import keys
from common.redis_client import DEFAULT_URL
from common.settings import Settings

log = logging.getLogger("axion.batches")

JOB_TIMEOUT_S = 24 * 3600 + 600  # the completion window and the time to write the files
RETRIES = 2  # a work horse killed mid-batch (OOM, a deploy) is retried; lines start over, the cache helps


def connect(settings: Settings) -> redis.Redis:
    """rq speaks the synchronous redis-py client."""
    return redis.Redis.from_url(settings.redis_url or DEFAULT_URL, socket_connect_timeout=settings.redis_timeout_s)


def enqueue(connection: redis.Redis, batch_id: str) -> str:
    """Queue the batch's job under the batch id (so `rq` output and the batch name the same thing)."""
    job = Queue(keys.BATCH_QUEUE, connection=connection).enqueue(
        "batches.runner.run_batch", batch_id, job_id=batch_id, job_timeout=JOB_TIMEOUT_S, retry=Retry(max=RETRIES),
        result_ttl=7 * 24 * 3600, failure_ttl=7 * 24 * 3600, description=f"batch {batch_id}")
    return str(job.id)


def serve(settings: Settings) -> int:
    """`axion batch-worker`: an rq worker on the batch queue (each batch runs in a forked work horse)."""
    worker = Worker([keys.BATCH_QUEUE], connection=connect(settings), name=None)
    log.info("batch worker listening on rq queue %s", keys.BATCH_QUEUE)
    worker.work(with_scheduler=False)
    return 0
