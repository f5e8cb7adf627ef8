"""Requests and tokens per minute per key, enforced in Redis by one Lua script so every API replica shares them.

Each limit is a token bucket holding at most its per-minute limit and refilling continuously (limit/60 per
second), as OpenAI describes its limits: a burst may use the whole minute's budget at once, then requests pass
at the refill rate. The script reads both buckets, admits the request only if both have room, and takes from
both, atomically (Redis runs a script alone); it reads the clock from Redis (`TIME`), so replicas with skewed
clocks still agree.

Tokens are counted up front, when the request arrives, and never settled afterwards: the prompt estimated at
4 characters per token (token-id inputs counted exactly), plus the most it may generate: `max_completion_tokens`
or `max_tokens` (16 when a legacy completion gives neither; MAX_SEQ_LEN minus the prompt when a chat request
gives neither), times `n`. Counting the worst case keeps a limit a real bound on the work a key can start;
clients that set `max_tokens` near what they use are charged near what they use.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import redis.asyncio as aioredis

from api.auth import Principal
from api.endpoints import endpoint
from api.errors import APIError
from common import keys

WINDOW_MS = 60_000
CHARS_PER_TOKEN = 4
RATE_LIMIT_HEADERS = [f"x-ratelimit-{what}-{dim}" for what in ("limit", "remaining", "reset")
                      for dim in ("requests", "tokens")]

# KEYS: the requests bucket, the tokens bucket. ARGV: rpm, tpm (0: no limit), the request's tokens, window ms.
# Returns: admitted (1/0), requests left, tokens left, ms until a denied request could pass (-1: never),
# ms until each bucket is full again (requests, tokens). Levels go back as strings (Lua numbers become integers).
SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[4])
local function level(key, limit)
  if limit <= 0 then return 0 end
  local v = redis.call('HMGET', key, 'level', 'ts')
  local stored, ts = tonumber(v[1]), tonumber(v[2])
  if stored == nil or ts == nil then return limit end
  return math.min(limit, stored + math.max(0, now - ts) * limit / window)
end
local rpm, tpm, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local r, k = level(KEYS[1], rpm), level(KEYS[2], tpm)
local ok, wait = 1, 0
if rpm > 0 and r < 1 then
  ok = 0
  wait = math.max(wait, (1 - r) * window / rpm)
end
if tpm > 0 and k < cost then
  ok = 0
  if cost > tpm then wait = -1 elseif wait >= 0 then wait = math.max(wait, (cost - k) * window / tpm) end
end
if ok == 1 then
  if rpm > 0 then
    r = r - 1
    redis.call('HSET', KEYS[1], 'level', tostring(r), 'ts', now)
    redis.call('PEXPIRE', KEYS[1], window)
  end
  if tpm > 0 then
    k = k - cost
    redis.call('HSET', KEYS[2], 'level', tostring(k), 'ts', now)
    redis.call('PEXPIRE', KEYS[2], window)
  end
end
local full_r, full_k = 0, 0
if rpm > 0 then full_r = (rpm - r) * window / rpm end
if tpm > 0 then full_k = (tpm - k) * window / tpm end
return {ok, tostring(r), tostring(k), tostring(math.ceil(wait)), tostring(math.ceil(full_r)),
        tostring(math.ceil(full_k))}
"""


class Decision(msgspec.Struct):
    admitted: bool
    headers: dict[str, str]
    error: APIError | None = None


def format_reset(ms: float) -> str:
    """A duration as OpenAI writes `x-ratelimit-reset-*`: `250ms`, `6s`, `1m30s`."""
    ms = max(0, math.ceil(ms))
    if ms < 1000:
        return f"{ms}ms"
    minutes, seconds = divmod(ms / 1000, 60)
    text = f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, window_ms: int = WINDOW_MS) -> None:
        self._script = redis.register_script(SCRIPT)
        self.window_ms = window_ms

    async def take(self, principal: Principal, tokens: int) -> Decision:
        """Admit one request costing `tokens` for `principal`, or say why not (a 429 with Retry-After)."""
        rpm, tpm = principal.rpm, principal.tpm
        if rpm <= 0 and tpm <= 0:
            return Decision(True, {})
        try:
            reply = await self._script(keys=[keys.rate_limit_bucket(principal.id, "requests"),
                                             keys.rate_limit_bucket(principal.id, "tokens")],
                                       args=[rpm, tpm, tokens, self.window_ms])
        except Exception:
            raise APIError(503, "The rate limiter is unreachable; retry shortly.", code="rate_limiter_unavailable",
                           headers={"Retry-After": "1"}) from None
        ok, r_left, k_left, wait_ms, r_full, k_full = (float(x) for x in reply)
        headers: dict[str, str] = {}
        if rpm > 0:
            headers |= {"x-ratelimit-limit-requests": str(rpm),
                        "x-ratelimit-remaining-requests": str(max(0, math.floor(r_left))),
                        "x-ratelimit-reset-requests": format_reset(r_full)}
        if tpm > 0:
            headers |= {"x-ratelimit-limit-tokens": str(tpm),
                        "x-ratelimit-remaining-tokens": str(max(0, math.floor(k_left))),
                        "x-ratelimit-reset-tokens": format_reset(k_full)}
        if ok:
            return Decision(True, headers)
        if wait_ms < 0:
            error = APIError(429, f"Request too large: it needs about {tokens} tokens, more than this key's limit "
                             f"of {tpm} tokens per minute. Lower max_tokens or shorten the input.",
                             type="tokens", code="rate_limit_exceeded", headers=headers | {"x-should-retry": "false"})
            return Decision(False, headers, error)
        which = "requests" if rpm > 0 and r_left < 1 else "tokens"
        limit = rpm if which == "requests" else tpm
        seconds = max(1, math.ceil(wait_ms / 1000))
        error = APIError(429, f"Rate limit reached for {which} per minute (limit {limit}). Please try again in "
                         f"{seconds}s.", type=which, code="rate_limit_exceeded",
                         headers=headers | {"Retry-After": str(seconds), "retry-after-ms": str(int(wait_ms))})
        return Decision(False, headers, error)


def estimate_tokens(path: str, body: Any, max_seq_len: int) -> int:
    """The tokens a request is charged (see the module's docstring); at least 1."""
    if not isinstance(body, dict):
        return 1
    prompt = 0
    for field in ("messages", "prompt", "input", "instructions", "query", "documents", "tokens", "text_1", "text_2"):
        prompt += _size(body.get(field))
    output = 0
    served = endpoint(path)
    if served is not None and served.generates:
        limit = (_int(body.get("max_completion_tokens")) or _int(body.get("max_tokens"))
                 or _int(body.get("max_output_tokens")))
        if limit is None:
            limit = served.default_output if served.default_output is not None else max(0, max_seq_len - prompt)
        output = limit * max(1, _int(body.get("n")) or 1, _int(body.get("best_of")) or 1)
        if served.several_prompts and isinstance(body.get("prompt"), list) and body["prompt"]:
            if not all(isinstance(x, int) for x in body["prompt"]):
                output *= len(body["prompt"])  # one completion per prompt
    return max(1, prompt + output)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _size(value: Any) -> int:
    """Estimated tokens in a prompt-bearing field: text at CHARS_PER_TOKEN, token ids one each."""
    chars, ids = 0, 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            ids += 1
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(v for k, v in item.items() if k in ("content", "text"))
    return math.ceil(chars / CHARS_PER_TOKEN) + ids
