"""Prompt prefill as replayed CUDA graphs, one per bucket of prompts x padded length.

On a GPU an eager forward pass costs tens of ms of Python and kernel launches whatever the prompt's length, and
under load a sequence joins almost every step, so an eager prefill would set the pace of the whole batch.
Here the prompts that prefill together are left-padded into a bucket of
rows x length, and one captured graph computes the bucket: ids and a validity mask go into static buffers, the
positions and the 4D causal mask are computed inside the graph, and each layer copies its keys and values into
a static buffer the engine then reads (into the decoding buffers, or the prefix cache) before the next replay.

Buckets larger than GRAPH_PREFILL_TOKENS prompt positions, and prompts continuing from a cached prefix, prefill
eagerly as before. A padding query attends to itself only, so its keys and values stay finite: masked positions
still enter SDPA's weighted sum (with weight 0), and 0 * NaN would be NaN.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from workers.chat.graphs import Attention, BufferLayer, capture
from workers.chat.kv import kv_layers, layer_kv, new_cache

log = logging.getLogger("axion.worker.graphs")

PREFILL_ROWS = (1, 2, 4, 8, 16, 32, 64)
PREFILL_LENS = (16, 32, 64, 128, 256, 512, 1024)


class _PrefillLayer(BufferLayer):
    """A fresh prompt's layer: it attends to its own keys and values, and copies them into the static buffers."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        self.keys.copy_(key_states)
        self.values.copy_(value_states)
        return key_states, value_states


@dataclass
class StaticLayer:
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class StaticKV:
    """Views of the static buffers ([rows, heads, len, dim] per layer), and all of them as one view `stacked`
    ([layers, 2, rows, heads, len, dim]) so a join copies them with one kernel: valid until the next replay."""

    layers: list[StaticLayer]
    stacked: torch.Tensor


class GraphPrefill:
    def __init__(self, model: Any, max_tokens: int, max_rows: int, max_len: int, capture: bool,
                 pad_id: int) -> None:
        self.model = model
        self.capture, self.pad_id = capture, pad_id
        self.buckets = sorted(((rows, length) for rows in PREFILL_ROWS for length in PREFILL_LENS
                               if rows * length <= max_tokens and rows <= max_rows and length <= max_len),
                              key=lambda b: (b[0] * b[1], b[1]))
        self._graphs: dict[tuple[int, int], tuple[Any, torch.Tensor | None]] = {}
        self._pool: Any = None
        self._flat = torch.empty(0)  # [layers, 2, positions x kv heads x head dim]: buckets view its start
        self.attention = Attention.of(model.config, max_len)
        self.captures = 0
        self.replays = 0

    def bucket(self, rows: int, length: int) -> tuple[int, int] | None:
        """The smallest bucket that holds `rows` prompts of up to `length` tokens, if any."""
        return next(((r, n) for r, n in self.buckets if r >= rows and n >= length), None)

    def _allocate(self) -> None:
        config = self.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        param = next(self.model.parameters())
        rows = max(r for r, _ in self.buckets)
        length = max(n for _, n in self.buckets)
        positions = max(r * n for r, n in self.buckets)
        # Every bucket views the start of one flat buffer, so buckets share the memory of the largest.
        size = positions * config.num_key_value_heads * head_dim
        self._flat = torch.zeros((config.num_hidden_layers, 2, size), dtype=param.dtype, device=param.device)
        self._shape = (config.num_key_value_heads, head_dim)
        self._ids = torch.zeros((rows, length), dtype=torch.long, device=param.device)
        self._valid = torch.ones((rows, length), dtype=torch.long, device=param.device)

    def _view(self, rows: int, length: int) -> torch.Tensor:
        """[layers, 2, rows, heads, length, dim] over the start of the flat buffer."""
        heads, dim = self._shape
        layers = self._flat.shape[0]
        return self._flat[:, :, : rows * heads * length * dim].view(layers, 2, rows, heads, length, dim)

    def capture_all(self) -> int:
        before = len(self._graphs)
        for bucket in self.buckets:
            if bucket not in self._graphs:
                self._graphs[bucket] = self._build(*bucket)
        return len(self._graphs) - before

    def run(self, prompts: list[list[int]]) -> tuple[StaticKV, torch.Tensor, torch.Tensor]:
        """Prefill `prompts` (which must fit a bucket) together: their keys and values (left-padded to the
        longest), the 2D mask [rows, width] of 0/1 and the last position's logits [rows, vocab]."""
        rows, width = len(prompts), max(len(p) for p in prompts)
        bucket = self.bucket(rows, width)
        assert bucket is not None, (rows, width)
        kb, length = bucket
        ids = [[self.pad_id] * (length - len(p)) + p for p in prompts]
        valid = [[0] * (length - len(p)) + [1] * len(p) for p in prompts]
        if not self._flat.numel():
            self._allocate()
        self._ids[rows:kb, :length].fill_(self.pad_id)
        self._valid[rows:kb, :length].fill_(1)
        self._ids[:rows, :length].copy_(torch.tensor(ids))
        self._valid[:rows, :length].copy_(torch.tensor(valid))
        graph = self._graphs.get(bucket)
        if graph is None:
            graph = self._graphs[bucket] = self._build(kb, length)
        run, logits = graph
        if self.capture:
            run.replay()
        else:
            logits = run()
        assert logits is not None
        self.replays += 1
        stacked = self._view(kb, length)[:, :, :rows, :, :, :][:, :, :, :, length - width:]
        layers = [StaticLayer(stacked[i, 0], stacked[i, 1]) for i in range(stacked.shape[0])]
        return StaticKV(layers, stacked), self._valid[:rows, length - width:length].clone(), logits[:rows]

    def _build(self, rows: int, length: int) -> tuple[Any, torch.Tensor | None]:
        if not self._flat.numel():
            self._allocate()
        view = self._view(rows, length)
        cache = Cache(layers=[_PrefillLayer(view[i, 0], view[i, 1]) for i in range(view.shape[0])])
        ids, valid = self._ids[:rows, :length], self._valid[:rows, :length]
        causal = torch.ones((length, length), dtype=torch.bool, device=ids.device).tril()
        itself = torch.eye(length, dtype=torch.bool, device=ids.device)

        def forward() -> torch.Tensor:
            positions = (valid.cumsum(dim=1) - 1).clamp(min=0)
            mask = causal & (valid.bool()[:, None, None, :] | itself)  # [rows, 1, length, length]
            mask = self.attention.masks(mask, positions[:, None, :, None], positions[:, None, None, :])
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True, logits_to_keep=1)
            return out.logits[:, -1, :]

        if not self.capture:
            return forward, None
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, logits = capture(forward, self._pool)
        self.captures += 1
        log.info("prefill graphs: captured %d prompts x %d positions (%d graphs)", rows, length, self.captures)
        return graph, logits


def owned(cache: DynamicCache | StaticKV, config: Any) -> DynamicCache:
    """A cache the engine may keep: static prefill buffers are copied out before the next prefill reuses them."""
    if not isinstance(cache, StaticKV):
        return cache
    owned = new_cache(config)
    for mine, theirs in zip(kv_layers(owned), cache.layers, strict=True):
        keys, values = layer_kv(theirs)
        mine.keys, mine.values = keys.clone(), values.clone()
        mine.is_initialized = True
    return owned
