"""Prompt-prefix KV reuse: the keys and values of prompt blocks already computed, looked up by token content.

A prompt is cut into blocks of BLOCK tokens; block i is keyed by (key of block i-1, its tokens), so a key
names a whole prefix, not just a block. A new prompt reuses the longest chain of blocks it shares with earlier
prompts (a common system prompt, the earlier turns of a chat) and computes only the rest. The engine stores a
prompt's blocks once it is prefilled, and a finished sequence's, its output included, when it leaves the batch.
Blocks are evicted least recently used once the cache holds more than its capacity in tokens; a chain is always
touched deepest block first, so a prefix is evicted after its continuations, never before (an orphaned block is
unreachable).
Blocks are copies (a prompt's new blocks share one), so a cached prefix never pins a whole batch's KV tensors
in memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from workers.chat.kv import kv_layers, layer_kv, new_cache

BLOCK = 16


@dataclass(eq=False)
class Block:
    parent: int | None
    tokens: tuple[int, ...]
    keys: list[torch.Tensor]  # one [1, kv_heads, BLOCK, head_dim] tensor per layer
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class PrefixCache:
    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_blocks = capacity_tokens // BLOCK
        self._blocks: OrderedDict[int, Block] = OrderedDict()
        self.hits = 0
        self.reused_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_blocks > 0

    @property
    def nbytes(self) -> int:
        return sum(block.nbytes for block in self._blocks.values())

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, prompt_ids: list[int], config: object) -> tuple[DynamicCache, int]:
        """A fresh cache holding the longest cached prefix of `prompt_ids` (at least one token left over)."""
        chain: list[Block] = []
        parent: int | None = None
        usable = (len(prompt_ids) - 1) // BLOCK  # the last prompt token is always computed, for its logits
        for i in range(usable if self.enabled else 0):
            tokens = tuple(prompt_ids[i * BLOCK:(i + 1) * BLOCK])
            key = hash((parent, tokens))
            block = self._blocks.get(key)
            if block is None or block.tokens != tokens or block.parent != parent:
                break
            chain.append(block)
            parent = key
        self._touch_deepest_first([hash((b.parent, b.tokens)) for b in chain])
        cache = new_cache(config)
        if chain:
            for layer in range(len(chain[0].keys)):
                cache.update(torch.cat([b.keys[layer] for b in chain], dim=2),
                             torch.cat([b.values[layer] for b in chain], dim=2), layer)
            self.hits += 1
            self.reused_tokens += len(chain) * BLOCK
        return cache, len(chain) * BLOCK

    def recomputed(self, tokens: int) -> None:
        """Found prefix tokens that the engine computed again after all (a prefill pass that recomputes positions
        it would otherwise pad, or a graph replay from an empty cache): not reused."""
        self.reused_tokens -= tokens

    def store(self, prompt_ids: list[int], cache: DynamicCache | torch.Tensor | Any, row: int = 0,
              offset: int = 0) -> None:
        """Copy every full block of a freshly prefilled prompt that is not cached yet; the prompt sits in batch row
        `row` of `cache`, from position `offset` on (left padding before it). `cache` is a DynamicCache, a graph
        prefill's StaticKV, or its `stacked` layout itself ([layers, 2, rows, heads, len, dim]; a row the decode
        graphs held, `GraphDecoder.row_kv`). The new blocks are copied out together and share the copy: one per
        layer, or one in all after a graph prefill. A copy per block per layer was ~130 small copies per prompt of
        64 tokens on a 16-layer model, each a kernel launch on a GPU. A block evicted before its siblings keeps
        their copy alive until they go too; never more than its own prompt's span."""
        if not self.enabled:
            return
        parent: int | None = None
        chain: list[int] = []
        new: list[tuple[int, int, tuple[int, ...], int | None]] = []
        for i in range(min(len(prompt_ids) // BLOCK, self.capacity_blocks)):
            tokens = tuple(prompt_ids[i * BLOCK:(i + 1) * BLOCK])
            key = hash((parent, tokens))
            if key not in self._blocks:
                new.append((i, key, tokens, parent))
            chain.append(key)
            parent = key
        if new:
            first, end = new[0][0], new[-1][0] + 1
            span = slice(offset + first * BLOCK, offset + end * BLOCK)
            stacked = cache if isinstance(cache, torch.Tensor) else getattr(cache, "stacked", None)  # one copy
            if stacked is not None:
                copy = stacked[:, :, row:row + 1, :, span].clone()
                keys, values = list(copy[:, 0]), list(copy[:, 1])
            else:
                assert not isinstance(cache, torch.Tensor)  # a tensor is its own `stacked`
                layers = [layer_kv(layer) for layer in kv_layers(cache)]
                keys = [k[row:row + 1, :, span].clone() for k, _ in layers]
                values = [v[row:row + 1, :, span].clone() for _, v in layers]
            for i, key, tokens, block_parent in new:
                part = slice((i - first) * BLOCK, (i - first + 1) * BLOCK)
                self._blocks[key] = Block(block_parent, tokens, [k[:, :, part] for k in keys],
                                          [v[:, :, part] for v in values])
        self._touch_deepest_first(chain)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)

    def _touch_deepest_first(self, chain: list[int]) -> None:
        for key in reversed(chain):
            self._blocks.move_to_end(key)
