"""The served app: the API with the Batch API's routes."""

from __future__ import annotations

import redis.asyncio as aioredis
from litestar import Litestar

from api.app import create_app as api_app
from batches.routes import EXTENSION as BATCH_API
from common.settings import Settings


def create_app(settings: Settings, redis: aioredis.Redis | None = None) -> Litestar:
    return api_app(settings, redis, extensions=[BATCH_API])
