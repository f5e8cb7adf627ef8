"""A KV cache whose full-attention layers append in place.

transformers' DynamicLayer appends a decoding step's keys and values with `torch.cat`, which copies the whole
cache of every layer on every step (a large share of a CPU decoding step).
GrowingLayer keeps each tensor in an over-allocated buffer and writes new positions into it; readers get a view
of the filled part. Assigning `keys`/`values` (as the engine does when it merges or trims the batch) adopts the
tensor as a new buffer with no spare room, so the next append reallocates instead of writing into storage that
another tensor may share.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

GROWTH = 1.5
MIN_SPARE = 32


class GrowingLayer(DynamicLayer):
    """Keys and values keep separate lengths: the engine reassigns one, then reads the other to reassign it."""

    _k: torch.Tensor | None = None
    _v: torch.Tensor | None = None
    _klen = 0
    _vlen = 0

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self._klen]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k, self._klen = value, _length(value)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self._vlen]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v, self._vlen = value, _length(value)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self._k is None or self._v is None or self._klen == 0:
            self.is_initialized = True
            self.device = key_states.device
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        self._k, self._klen = _append(self._k, self._klen, key_states)
        self._v, self._vlen = _append(self._v, self._vlen, value_states)
        return self._k[:, :, : self._klen], self._v[:, :, : self._vlen]


def _length(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.dim() < 3 else t.shape[2]


def _append(buffer: torch.Tensor, length: int, new: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Write `new` after the first `length` positions of `buffer`, growing it (amortised) when full."""
    end = length + new.shape[2]
    if end > buffer.shape[2]:
        shape = list(buffer.shape)
        shape[2] = max(end + MIN_SPARE, int(end * GROWTH))
        grown = buffer.new_empty(shape)
        grown[:, :, :length] = buffer[:, :, :length]
        buffer = grown
    buffer[:, :, length:end] = new
    return buffer, end


def new_cache(config: object) -> DynamicCache:
    """A DynamicCache for `config` with every layer a GrowingLayer, sliding-window layers (Gemma 2/3, Mistral)
    included: the engine left-pads, concatenates and trims rows with one attention mask over the whole cached
    length, while a sliding layer keeps only its last `window` positions and sizes its mask from its own count, so
    a batch that outgrew the window failed ("size of tensor a (55) must match ... (8)", tests/test_sliding_window).
    Kept whole, those layers get their window from the sliding mask transformers builds from the config; the cost
    is their memory, which no longer stops growing at the window."""
    cache = DynamicCache(config=config)  # type: ignore[arg-type]
    cache.layers = [GrowingLayer() if isinstance(layer, DynamicLayer) else layer for layer in cache.layers]
    return cache


class KVLayer(Protocol):
    """What the engine reads of a cache layer: transformers' layers, GrowingLayer, a graph prefill's StaticLayer."""

    @property
    def keys(self) -> torch.Tensor | None: ...

    @property
    def values(self) -> torch.Tensor | None: ...


def kv_layers(cache: Cache) -> list[CacheLayerMixin]:
    """`cache.layers` typed as key/value layers: transformers types them as a union with linear-attention and dummy
    layers, which the engine's caches (built by `new_cache`) never hold."""
    return cast("list[CacheLayerMixin]", cache.layers)


def layer_kv(layer: KVLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """A filled layer's keys and values, narrowed from Optional; the engine only reads layers it has filled."""
    keys, values = layer.keys, layer.values
    if keys is None or values is None:
        raise ValueError(f"{type(layer).__name__} holds no keys/values yet")
    return keys, values


def pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad dim 2 (KV: [batch, heads, seq, dim]) or dim 1 (mask: [batch, seq]) with zeros to `length`."""
    dim = 2 if t.dim() == 4 else 1
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def stack_past(parts: list[tuple[DynamicCache | None, int]], config: object) -> DynamicCache:
    """One batch cache from each row's own: row i keeps the first `keep` positions of its cache, left-padded with
    zeros to the longest kept length (a row keeping nothing is all padding). At least one row keeps some."""
    width = max(keep for _, keep in parts)
    reference = next(cache for cache, keep in parts if cache is not None and keep > 0)
    stacked = new_cache(config)
    for index, layer in enumerate(kv_layers(reference)):
        rows = [layer_kv(kv_layers(cache)[index] if cache is not None and keep > 0 else layer)
                for cache, keep in parts]
        keys = [pad_left(k[:1, :, :keep], width) for (k, _), (_, keep) in zip(rows, parts, strict=True)]
        values = [pad_left(v[:1, :, :keep], width) for (_, v), (_, keep) in zip(rows, parts, strict=True)]
        stacked.update(torch.cat(keys, dim=0), torch.cat(values, dim=0), index)
    return stacked


def padding_groups(rests: list[int], slack: float = 2.0) -> list[list[int]]:
    """Indices of rows to prefill, grouped into left-padded passes whose padded size (rows x the longest rest)
    stays within `slack` x the tokens they hold: longest rests first, each group in the original order. Rests of
    like length make one pass; one long prompt does not pad fifteen short ones to its length."""
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in sorted(range(len(rests)), key=lambda i: -rests[i]):
        if current and (len(current) + 1) * rests[current[0]] > slack * (real + rests[i]):
            groups.append(sorted(current))
            current, real = [], 0
        current.append(i)
        real += rests[i]
    if current:
        groups.append(sorted(current))
    return groups
