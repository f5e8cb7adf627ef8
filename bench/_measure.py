"""What every benchmark side shares: per-request timings, their summary, and the prompts.

The server driver, the in-process engine loop and the `generate` baselines all record the same `RequestTiming`
and are summarised by the same `summarize`, so their rows in one table are computed identically.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devtools.chat_models import CORPUS

# Plain lower-case words: every tokenizer encodes them in one or two tokens, so lengths are easy to hit.
WORDS: list[str] = sorted({w.lower() for w in re.findall(r"[A-Za-z]{3,}", CORPUS)})


@dataclass
class RequestTiming:
    """One request, timed with `time.perf_counter`.

    `chunks` are the arrival times of the pieces of output (an SSE chunk, an engine event, a generated token);
    one piece may carry several tokens, so the inter-token latency is taken from the first and the last piece
    and the token count, not from the gaps.
    """

    sent: float
    first: float | None = None  # first piece with text (server) / first event (engine) / first token
    last: float | None = None  # the piece that carried the last token
    completion_tokens: int = 0
    prompt_tokens: int = 0
    chunks: list[float] = field(default_factory=list)
    cached_tokens: int | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def itl(self) -> float | None:
        """Mean gap between tokens after the first: (t_last - t_first) / (tokens - 1)."""
        if self.first is None or self.last is None or self.completion_tokens < 2:
            return None
        return (self.last - self.first) / (self.completion_tokens - 1)

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]


@dataclass
class LevelStats:
    """One row of a results table; times are in milliseconds, throughput in output tokens per second."""

    system: str
    concurrency: int
    requests: int
    wall_s: float
    completion_tokens: int
    tokens_per_s: float
    prompt_tokens_mean: float
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    gap_p50_ms: float | None = None
    gap_p99_ms: float | None = None
    short_requests: int = 0  # requests that produced fewer or more tokens than asked
    extra: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)  # per request, for --json


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no data."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


def summarize(system: str, concurrency: int, timings: list[RequestTiming], wall_s: float,
              expected_tokens: int) -> LevelStats:
    """Throughput over the whole wall time of the level; latencies pooled over its requests."""
    tokens = sum(t.completion_tokens for t in timings)
    ttfts = [t.ttft for t in timings if t.ttft is not None]
    itls = [t.itl for t in timings if t.itl is not None]
    gaps = [g for t in timings for g in t.gaps()]
    return LevelStats(
        system=system, concurrency=concurrency, requests=len(timings), wall_s=wall_s, completion_tokens=tokens,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        prompt_tokens_mean=sum(t.prompt_tokens for t in timings) / max(1, len(timings)),
        ttft_p50_ms=_ms(percentile(ttfts, 50)), ttft_p99_ms=_ms(percentile(ttfts, 99)),
        itl_p50_ms=_ms(percentile(itls, 50)), itl_p99_ms=_ms(percentile(itls, 99)),
        gap_p50_ms=_ms(percentile(gaps, 50)), gap_p99_ms=_ms(percentile(gaps, 99)),
        short_requests=sum(1 for t in timings if t.completion_tokens != expected_tokens),
        samples=[{"ttft_ms": _ms(t.ttft), "itl_ms": _ms(t.itl), "completion_tokens": t.completion_tokens,
                  "prompt_tokens": t.prompt_tokens, "pieces": len(t.chunks)} for t in timings],
    )


def level_key(concurrency: int, i: int) -> str:
    """The i-th prompt of a concurrency level: the same for the server and the engine-alone run at that level,
    different from every other level's, so a server-side prefix cache gets no hits from an earlier level (and a
    repeat of the level puts its own prefix before it)."""
    return f"c{concurrency}-{i}"


def warmup_key(concurrency: int, i: int) -> str:
    """The i-th prompt of a level's warm-up round: the same for the server and the engine-alone run."""
    return f"warmup-c{concurrency}-{i}"


def _fit(words: list[str], length_of: Callable[[str], int], target: int) -> str:
    """The shortest prefix of `words` whose text is at least `target` tokens long (binary search)."""
    low, high = 1, len(words)
    while low < high:
        mid = (low + high) // 2
        if length_of(" ".join(words[:mid])) >= target:
            high = mid
        else:
            low = mid + 1
    return " ".join(words[:low])


class PromptFactory:
    """Deterministic, distinct prompts of a fixed token length, measured with the model's own tokenizer.

    Every request gets different words (seeded by its index), so a prefix cache cannot make one side of a
    comparison look better; the same index gives the same prompt to the server and to the engine-alone runs.
    """

    def __init__(self, tokenizer: Any, prompt_tokens: int, header_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self._cache: dict[str, str] = {}
        # One system message before every user message, as chat templates with a fixed header (Llama 3's dates,
        # Qwen's default system prompt) give every prompt the same first tokens: the prefix cache then finds them.
        self.header = self.system("header", header_tokens) if header_tokens else ""

    def _words(self, seed: str, count: int) -> list[str]:
        rng = random.Random(seed)
        return [rng.choice(WORDS) for _ in range(count)]

    def templated_length(self, messages: list[dict[str, str]]) -> int:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return len(ids["input_ids"] if isinstance(ids, dict) else ids)

    def user(self, key: str) -> str:
        """A user message whose whole chat-templated prompt is ~`prompt_tokens` tokens; `key` seeds its words."""
        if key not in self._cache:
            words = self._words(key, self.prompt_tokens + 8)
            self._cache[key] = _fit(words, lambda text: self.templated_length([{"role": "user", "content": text}]),
                                    self.prompt_tokens)
        return self._cache[key]

    def system(self, key: str, tokens: int) -> str:
        """A system prompt of ~`tokens` tokens of its own (template tokens not counted)."""
        cache_key = f"system-{key}-{tokens}"
        if cache_key not in self._cache:
            words = self._words(cache_key, tokens + 8)
            self._cache[cache_key] = _fit(
                words, lambda text: len(self.tokenizer(text, add_special_tokens=False)["input_ids"]), tokens)
        return self._cache[cache_key]

    def messages(self, key: str) -> list[dict[str, str]]:
        """The user message of `key`, after the shared header when there is one (the header's tokens come on top
        of the ~`prompt_tokens` of the user message's templated prompt)."""
        header = [{"role": "system", "content": self.header}] if self.header else []
        return [*header, {"role": "user", "content": self.user(key)}]

    def ids(self, key: str) -> list[int]:
        ids = self.tokenizer.apply_chat_template(self.messages(key), add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return [int(t) for t in (ids["input_ids"] if isinstance(ids, dict) else ids)]
