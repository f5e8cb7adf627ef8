"""Who is calling: `Authorization: Bearer <key>` checked against API_KEYS and the keys `axion keys` keeps in
Redis; 401 `invalid_api_key` otherwise. Off unless API_KEYS or REQUIRE_API_KEY is set.

API_KEYS are compared by their SHA-256 digests with `hmac.compare_digest`, against every configured key without
stopping at a match, so the time taken says nothing about how much of a guess was right. Redis keys are looked
up by the SHA-256 of the given key: what that lookup's timing could leak is about a hash no one can invert.
A found Redis key is remembered for CACHE_S, so a revoked key stops working within that time.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from contextvars import ContextVar

import msgspec
import redis.asyncio as aioredis

from api.errors import APIError
from common import apikeys, keys
from common.settings import Settings, split_list

#: The web console's page (`api/console.py`): open to all, as it holds no data.
CONSOLE_PAGE = "/console"

CACHE_S = 2.0
CACHE_ENTRIES = 10_000


class Principal(msgspec.Struct, frozen=True):
    """The caller of one request: a key (its id, never the key) and what it may do."""

    id: str
    name: str = ""
    models: frozenset[str] | None = None
    rpm: int = 0
    tpm: int = 0

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


#: The caller of the request being served (set by `api.guard.RequestGuard`); None outside any request.
current: ContextVar[Principal | None] = ContextVar("axion_principal", default=None)


def may_use(model: str) -> bool:
    """Whether the current caller may see and use `model` (always, outside a request or with auth off)."""
    principal = current.get()
    return principal is None or principal.may_use(model)


def owner() -> str:
    """Whose files and batches the current caller sees: its key's id (everyone's, with keys off)."""
    principal = current.get()
    return principal.id if principal is not None else keys.ANONYMOUS_OWNER


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class Authenticator:
    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.required = settings.auth_required
        self.redis = redis
        self.anonymous = Principal(keys.ANONYMOUS_OWNER, rpm=settings.rate_limit_rpm, tpm=settings.rate_limit_tpm)
        self._defaults = (settings.rate_limit_rpm, settings.rate_limit_tpm)
        # ADMIN_API_KEYS pass here too: an operator's admin key is good for every endpoint (api/admin.py).
        static = split_list(settings.api_keys) + split_list(settings.admin_api_keys)
        self._static = [(hashlib.sha256(k.encode()).digest(), k) for k in static]
        self._open = split_list(settings.open_paths)
        self._cache: dict[str, tuple[float, Principal]] = {}

    def is_open(self, path: str) -> bool:
        """OPEN_PATHS: exact paths, or prefixes written with a trailing `*`."""
        if path == CONSOLE_PAGE:
            return True
        return any(path == p or (p.endswith("*") and path.startswith(p[:-1])) for p in self._open)

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller named by an `Authorization` header value; APIError 401 when there is none or it is unknown."""
        if not self.required:
            return self.anonymous
        scheme, _, key = (authorization or "").strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise unauthorized("You didn't provide an API key. Send it in an Authorization header: "
                               "'Authorization: Bearer YOUR_KEY'.")
        digest = hashlib.sha256(key.encode()).digest()
        matched: str | None = None
        for known_digest, known in self._static:
            if hmac.compare_digest(digest, known_digest):
                matched = known
        if matched is not None:
            return Principal(apikeys.key_id(matched), "API_KEYS", None, *self._defaults)
        principal = await self._stored(digest.hex())
        if principal is None:
            raise unauthorized("Incorrect API key provided.")
        return principal

    async def _stored(self, key_hash: str) -> Principal | None:
        now = time.monotonic()
        hit = self._cache.get(key_hash)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            raw = await self.redis.hget(keys.API_KEYS, key_hash)
        except Exception:  # Redis down: the key cannot be checked, and a retry may succeed
            raise APIError(503, "The key store is unreachable; retry shortly.", code="key_store_unavailable",
                           headers={"Retry-After": "1"}) from None
        if raw is None:
            self._cache.pop(key_hash, None)
            return None
        try:
            record = apikeys.decode_record(raw)
        except msgspec.DecodeError:
            return None
        principal = Principal(record.id, record.name, None if record.models is None else frozenset(record.models),
                              self._defaults[0] if record.rpm is None else record.rpm,
                              self._defaults[1] if record.tpm is None else record.tpm)
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.clear()
        self._cache[key_hash] = (now + CACHE_S, principal)
        return principal
