"""Stored Responses API answers (fakeredis): each belongs to the key that made it, and expires."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest

from api import auth
from api import protocol as p
from api import protocol_responses as r
from api.errors import APIError
from api.serving_responses import ResponseStore
from common import keys


def _stored(response_id: str) -> r.StoredResponse:
    response = r.ResponseObject(id=response_id, created_at=0, status="completed", model="m", output=[])
    return r.StoredResponse(response, [p.RequestMessage("user", "hi")], auth.owner())


def test_only_the_key_that_stored_a_response_reads_continues_or_deletes_it() -> None:
    async def go() -> None:
        redis = fakeredis.FakeAsyncRedis()
        store = ResponseStore(redis, ttl_s=60)
        auth.current.set(auth.Principal(id="key-a"))
        await store.save(_stored("resp_1"))
        assert 0 < await redis.ttl(keys.response("resp_1")) <= 60
        assert (await store.load("resp_1")).messages[0].content == "hi"
        auth.current.set(auth.Principal(id="key-b"))
        with pytest.raises(APIError) as missing:
            await store.load("resp_1")
        assert missing.value.status == 404
        with pytest.raises(APIError) as named:
            await store.load("resp_1", "previous_response_id")
        assert (named.value.status, named.value.param) == (400, "previous_response_id")
        with pytest.raises(APIError):
            await store.delete("resp_1")
        auth.current.set(auth.Principal(id="key-a"))
        assert (await store.delete("resp_1")).deleted
        assert await redis.exists(keys.response("resp_1")) == 0

    asyncio.run(go())
