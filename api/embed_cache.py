"""The embedding cache: one entry per input, so a request that repeats some inputs computes only the others.

An embedding is a pure function of (model, model revision, input, dimensions, truncate): every input is
cacheable unless the client's Cache-Control says otherwise. The input is the client's text or token-id list
as sent (token ids are not decoded here, so text and ids never share an entry). `truncate` is in the key
because a too-long input is a 400 without it and a truncated vector with it.

An entry is the input's token count (after truncation; 4 bytes, little-endian) followed by the vector as
little-endian float32, exactly the bytes the worker sent, so a hit returns the very vector a miss computed and
`usage.prompt_tokens` stays the same whether the inputs came from the cache or the model.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from api.cache import EMBED_NAMESPACE, LruStore, cache_key, decide
from common.settings import Settings

_TOKENS = struct.Struct("<I")


@dataclass
class Row:
    """One input's answer: its token count and its vector (little-endian float32 bytes)."""

    tokens: int
    vector: bytes

    def pack(self) -> bytes:
        return _TOKENS.pack(self.tokens) + self.vector

    @classmethod
    def unpack(cls, value: bytes) -> Row:
        return cls(_TOKENS.unpack_from(value)[0], value[_TOKENS.size:])


def embed_store(redis: aioredis.Redis, settings: Settings) -> LruStore:
    """The shared namespace; cheap to build (~7 µs), so each request builds its own and needs no app state."""
    return LruStore(redis, EMBED_NAMESPACE, settings.embed_cache_capacity, settings.cache_ttl_s)


def members(model: str, revision: str, inputs: list[str] | list[list[int]], dimensions: int | None,
            truncate: bool) -> list[str]:
    """The cache member of each input, in input order."""
    return [cache_key(model, revision, {"input": x, "dimensions": dimensions, "truncate": truncate})
            for x in inputs]


@dataclass
class Lookup:
    """What the cache gave one request: a row per input (None = to compute), and what it may do."""

    members: list[str]
    rows: list[Row | None]
    read: bool
    write: bool
    header: str = field(init=False)

    @property
    def missing(self) -> dict[str, int]:
        """Each member still to compute, once, mapped to the first input index that needs it: a request that
        repeats an input sends it to the model once."""
        todo: dict[str, int] = {}
        for i, (member, row) in enumerate(zip(self.members, self.rows, strict=True)):
            if row is None:
                todo.setdefault(member, i)
        return todo

    def __post_init__(self) -> None:
        """`x-axion-cache`: hit (no input computed), miss (some computed), bypass (the cache was not read); set
        here because the rows are filled in once the missing ones are computed."""
        self.header = "bypass" if not self.read else "miss" if any(r is None for r in self.rows) else "hit"


def permissions(store: LruStore, cache_control: str | None) -> tuple[bool, bool]:
    """(read, write) for this request: the store must be on, and Cache-Control may forbid either."""
    decision = decide("embeddings", cache_control)  # the key is per input; only the directives matter here
    return store.enabled and decision.read, store.enabled and decision.write


async def lookup(store: LruStore, members_: list[str], read: bool, write: bool) -> Lookup:
    """One round trip for every input of the request (none when the cache is not to be read)."""
    if not read:
        return Lookup(members_, [None] * len(members_), False, write)
    values = await store.get_many(members_)
    return Lookup(members_, [None if v is None else Row.unpack(v) for v in values], True, write)


def split(vectors: bytes, dim: int, tokens: list[int]) -> list[Row]:
    """The worker's answer (rows of `dim` float32, one after another) as one Row per input."""
    size = dim * 4
    return [Row(n, vectors[k * size:(k + 1) * size]) for k, n in enumerate(tokens)]
