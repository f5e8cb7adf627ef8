"""Decoding steps as replayed CUDA graphs over static KV buffers.

An eager decoding step launches hundreds of small kernels, and on a GPU the step is bound by launching them from
Python, not by the GPU (bench/RESULTS.md). A CUDA graph replays the whole forward pass with one launch,
but it needs every tensor at a fixed address and shape. So the running batch's keys and values live in buffers
of MAX_BATCH_SIZE rows (slots) x GRAPH_MAX_LEN positions, allocated once, and each step writes its new column in
place, the same column for every slot. One graph is captured per bucket of slots x cached length, all of them at
the worker's warm-up (`capture_all`); every bucket is a view of the same buffers, so moving to a longer bucket as
the sequences grow copies nothing.

While the buffers hold the batch they are its only copy, and sequences join and leave in place:
- a sequence that leaves frees its slot and nothing is copied (the slot computes garbage until reused);
- joining sequences go into free slots, their prompts' keys and values written so they end at the shared
  column. A prompt longer than the columns used so far moves the shared column on: the other rows get masked
  gap columns, which cost memory but not correctness, since every row's positions and mask are its own.
Only when the shared column reaches GRAPH_MAX_LEN is the batch compacted (`unload`: each row's real columns
gathered to the left), and decoding goes on eagerly past the buffers (a longer context, a batch larger than
MAX_BATCH_SIZE) or for models the static path would compute wrongly (`unsupported`: attention other than SDPA,
Gemma 2's). Sliding-window layers get a mask of their own, windowed by the positions each column records
(`Attention`). Masked positions still enter SDPA's weighted sum with weight 0, so every buffer position holds
finite values: zeros, or keys and values some earlier step computed.

On a CPU the same static path runs without capture (DECODE_GRAPHS=on): the tests check it against `generate` and
that a step makes no host synchronisation, which would break capture on a GPU.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from workers.chat.kv import kv_layers, new_cache

log = logging.getLogger("axion.worker.graphs")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MIN_LEN_BUCKET = 128


class BufferLayer(CacheLayerMixin):
    """A cache layer over views of static buffers (fixed addresses, as a graph needs): the masks come with the
    call, so it reports its buffers' length; subclasses say how `update` writes into them."""

    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        assert self.keys is not None
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        assert self.keys is not None
        return self.keys.shape[2]


class _ColumnLayer(BufferLayer):
    """One layer's static keys and values; `update` writes the step's column at the shared `column` index."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor) -> None:
        super().__init__(keys, values)
        self.column = column

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        self.keys.index_copy_(2, self.column, key_states)
        self.values.index_copy_(2, self.column, value_states)
        return self.keys, self.values


def unsupported(config: Any, max_len: int) -> str | None:
    """Why the static path would not compute what the model computes, or None when it does.

    It hands the layers boolean masks, as SDPA takes them: an eager attention (Gemma 2's) adds the mask to its
    scores instead, and gave other tokens than `generate` (tests/test_decode_graphs.py)."""
    attention = getattr(config, "_attn_implementation", None)
    if attention != "sdpa":
        return f"attention {attention!r}, not sdpa"
    types = set(getattr(config, "layer_types", None) or [])
    if not types <= {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(types)}"
    return None


@dataclass(frozen=True)
class Attention:
    """Which masks the model's layers take. Sliding layers (Gemma 3's local layers, Mistral's every layer) see only
    the last `window` positions: in the static buffers a row's columns are not its positions (left padding, and
    the gap columns a joining prompt leaves), so the window is applied to positions each column records, not to
    columns as transformers' own sliding mask does. With `by_type` the masks go keyed by layer type
    (`config.layer_types`: Gemma 3, Qwen 2/3), else one mask serves every layer (Mistral)."""

    window: int | None  # None: no sliding layer, or a window no shorter than the buffers
    by_type: bool

    @classmethod
    def of(cls, config: Any, max_len: int) -> Attention:
        types = set(getattr(config, "layer_types", None) or [])
        window = getattr(config, "sliding_window", None)
        sliding = "sliding_attention" in types or (not types and bool(window))
        return cls(int(window) if sliding and window and window < max_len else None, bool(types))

    def masks(self, full: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor) -> Any:
        """The attention_mask argument: `full` (boolean, [rows, 1, queries, keys]) and, with a window, the same
        limited to keys fewer than `window` positions back ([rows, 1, queries, 1] and [rows, 1, 1, keys])."""
        if self.window is None:
            return full
        sliding = full & (query_positions - key_positions < self.window)
        return {"full_attention": full, "sliding_attention": sliding} if self.by_type else sliding


def buckets(limit: int, sizes: tuple[int, ...]) -> list[int]:
    return sorted({s for s in sizes if s < limit} | {limit})


class GraphDecoder:
    """Static buffers and one captured graph per (slots, length) bucket; `capture=False` replays eagerly (CPU).

    `slots[i]` is the buffer row of the engine's batch row i."""

    def __init__(self, model: Any, max_rows: int, max_len: int, capture: bool) -> None:
        self.model = model
        self.capture = capture
        self.max_rows, self.max_len = max_rows, max_len
        self.row_buckets = buckets(max_rows, BATCH_BUCKETS)
        self.len_buckets = buckets(max_len, tuple(MIN_LEN_BUCKET << i for i in range(16)))
        self.attention = Attention.of(model.config, max_len)
        self._kv = torch.empty(0)  # [layers, 2 (keys, values), slots, kv heads, positions, head dim]
        self._keys: list[torch.Tensor] = []  # views of _kv, one per layer
        self._values: list[torch.Tensor] = []
        self._graphs: dict[tuple[int, int], tuple[Any, torch.Tensor | None, Any]] = {}
        self._pool: Any = None
        self.slots: list[int] = []
        self._free: list[int] = []  # a heap: the lowest free slot is taken first, so the used ones stay packed
        self._slot_index: torch.Tensor | None = None  # `slots` on the device, rebuilt after a change
        self.length = 0  # the shared column the next step writes
        self.captures = 0
        self.replays = 0

    @property
    def rows(self) -> int:
        return len(self.slots)

    @property
    def holding(self) -> bool:
        return bool(self.slots)

    def fits(self, rows: int, cached: int) -> bool:
        return rows <= self.max_rows and cached + 1 <= self.max_len

    def has_room(self) -> bool:
        """Whether the next step's column still fits in the buffers."""
        return self.length + 1 <= self.max_len

    def _allocate(self, like: torch.Tensor, layers: int) -> None:
        device, dtype = like.device, like.dtype
        shape = (self.max_rows, like.shape[1], self.max_len, like.shape[3])
        # One tensor for every layer's keys and values: a join, a load or a compaction is one kernel for all
        # layers instead of one per layer per tensor (32 for a 16-layer model), each a launch on a GPU.
        self._kv = torch.zeros((layers, 2, *shape), device=device, dtype=dtype)
        self._keys = [self._kv[i, 0] for i in range(layers)]
        self._values = [self._kv[i, 1] for i in range(layers)]
        self._ids = torch.zeros((self.max_rows, 1), dtype=torch.long, device=device)
        self._positions = torch.zeros((self.max_rows, 1), dtype=torch.long, device=device)
        self._mask = torch.zeros((self.max_rows, 1, 1, self.max_len), dtype=torch.bool, device=device)
        self._column = torch.zeros(1, dtype=torch.long, device=device)
        self._column_positions = torch.zeros((self.max_rows, self.max_len), dtype=torch.long, device=device)
        gib = 2 * layers * self._keys[0].numel() * self._keys[0].element_size() / 2**30
        log.info("decode graphs: KV buffers for %d rows x %d positions (%.2f GiB), %s", self.max_rows, self.max_len,
                 gib, "CUDA graphs" if self.capture else "eager (no capture)")

    def _allocate_from_config(self) -> None:
        config = self.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        param = next(self.model.parameters())
        like = torch.empty((1, config.num_key_value_heads, 1, head_dim), dtype=param.dtype, device=param.device)
        self._allocate(like, config.num_hidden_layers)

    def capture_all(self) -> int:
        """Capture every bucket now (the worker's warm-up), not the first time a batch needs it: a capture runs
        the forward pass three times, eagerly, and done lazily each would stall the whole batch. Without capture
        (CPU) it builds the buckets' eager steps. Returns the number of buckets built."""
        if self.holding:
            return 0
        if not self._keys:
            self._allocate_from_config()
        self._mask.zero_()
        self._mask[:, 0, 0, 0] = True  # the warm-up passes attend to one zero position: finite keys and values
        before = len(self._graphs)
        for rows in self.row_buckets:
            for length in self.len_buckets:
                if (rows, length) not in self._graphs:
                    self._graphs[(rows, length)] = self._build(rows, length)
        self._kv.zero_()
        return len(self._graphs) - before

    def load(self, cache: Any, mask: torch.Tensor) -> None:
        """Take the engine's batch (cache [rows, heads, len, dim] per layer, 2D mask [rows, len]) into the buffers,
        which become its only copy. The mask columns past `len` of every slot are cleared."""
        rows, length = mask.shape
        layers = cache.layers
        if not self._keys:
            self._allocate(layers[0].keys, len(layers))
        stacked = getattr(cache, "stacked", None)
        if stacked is not None:
            self._kv[:, :, :rows, :, :length].copy_(stacked)
        else:
            for layer, keys, values in zip(layers, self._keys, self._values, strict=True):
                keys[:rows, :, :length].copy_(layer.keys)
                values[:rows, :, :length].copy_(layer.values)
        self._mask.zero_()
        self._mask[:rows, 0, 0, :length] = mask.bool()
        self._mask[rows:, 0, 0, 0] = True  # free slots attend to one (zero) position: no all-masked softmax
        self._positions[:rows, 0] = mask.sum(dim=1)
        self._column_positions[:rows, :length] = mask.cumsum(dim=1) - 1
        self.slots, self._free, self._slot_index = list(range(rows)), list(range(rows, self.max_rows)), None
        self.length = length

    def insert(self, cache: Any, mask: torch.Tensor) -> bool:
        """Add rows after the held ones (prompts done: cache [k, heads, len, dim] per layer, mask [k, len]) into
        free slots, ending at the shared column; False (nothing done) when they do not fit."""
        k, width = mask.shape
        length = max(self.length, width)
        if len(self.slots) + k > self.max_rows or length + 1 > self.max_len:
            return False
        new = [heapq.heappop(self._free) for _ in range(k)]
        index = torch.tensor(new, device=self._mask.device)
        start = length - width
        stacked = getattr(cache, "stacked", None)
        if stacked is not None:
            self._kv[:, :, :, :, start:length].index_copy_(2, index, stacked)
        else:
            for layer, keys, values in zip(cache.layers, self._keys, self._values, strict=True):
                keys[:, :, start:length].index_copy_(0, index, layer.keys)
                values[:, :, start:length].index_copy_(0, index, layer.values)
        self._mask.index_fill_(0, index, False)
        self._mask[:, :, :, start:length].index_copy_(0, index, mask.bool()[:, None, None, :])
        self._positions.index_copy_(0, index, mask.sum(dim=1, keepdim=True).to(torch.long))
        self._column_positions[:, start:length].index_copy_(0, index, (mask.cumsum(dim=1) - 1).to(torch.long))
        self.slots += new
        self._slot_index, self.length = None, length
        return True

    def release(self, rows: list[int]) -> None:
        """The engine's batch rows `rows` left: their slots are free (nothing is copied or cleared)."""
        gone = set(rows)
        for i in gone:
            heapq.heappush(self._free, self.slots[i])
        self.slots = [s for i, s in enumerate(self.slots) if i not in gone]
        self._slot_index = None

    def discard(self) -> None:
        """Forget the held batch (it finished or failed as a whole): nothing to copy back."""
        self.slots, self._free, self._slot_index, self.length = [], [], None, 0

    def unload(self) -> tuple[Any, torch.Tensor]:
        """Give the engine its batch back, compacted: each row's real columns gathered to the left, in batch
        row order (cache [rows, heads, len, dim] per layer, 2D mask [rows, len] of 0/1)."""
        index, length = self._index(), self.length
        mask = self._mask[:, 0, 0, :length].index_select(0, index)
        width = int(mask.sum(dim=1).max())
        order = torch.sort(mask.to(torch.int32), dim=1, stable=True).indices[:, length - width:]
        compact = torch.gather(mask, 1, order).to(torch.long)
        kv = self._kv[:, :, :, :, :length].index_select(2, index)
        layers, _, rows, heads, _, dim = kv.shape
        kv = torch.gather(kv, 4, order[None, None, :, None, :, None].expand(layers, 2, rows, heads, width, dim))
        cache = new_cache(self.model.config)
        for i, layer in enumerate(kv_layers(cache)):
            layer.keys, layer.values = kv[i, 0], kv[i, 1]
            layer.is_initialized = True
        self.discard()
        return cache, compact

    def row_kv(self, row: int, positions: int) -> torch.Tensor:
        """Batch row `row`'s keys and values, its `positions` real columns in order ([layers, 2, 1, kv heads,
        positions, head dim]). A row held while a wider one joined has masked columns between its own (`insert`
        moved the shared column past them), so they are picked by the mask, on the device: `positions` comes from
        the host, and nothing waits for a step launched ahead."""
        slot = self.slots[row]
        mask = self._mask[slot, 0, 0, :self.length].to(torch.int32)
        columns = torch.sort(mask, stable=True).indices[self.length - positions:]
        return self._kv[:, :, slot:slot + 1].index_select(4, columns)

    def held_bytes(self) -> int:
        if not self.holding:
            return 0
        per_row_position = sum(k.shape[1] * k.shape[3] * k.element_size() for k in self._keys + self._values)
        return self.rows * self.length * per_row_position

    def _index(self) -> torch.Tensor:
        if self._slot_index is None:
            self._slot_index = torch.tensor(self.slots, device=self._mask.device)
        return self._slot_index

    @property
    def device(self) -> torch.device:
        return self._ids.device

    def prime(self) -> None:
        """Put the slot index on the device now (a blocking copy), not inside a step."""
        self._index()

    def feed_on_device(self, tokens: torch.Tensor) -> None:
        """The next step's inputs from this step's tokens ([rows], on the device, batch row order): no host trip."""
        self._ids.index_copy_(0, self._index(), tokens[:, None])

    def feed_rows(self, rows: list[int], tokens: list[int]) -> None:
        """Host tokens as the next inputs of some batch rows (sequences that joined since the last step)."""
        device = self._ids.device
        index = torch.tensor([self.slots[r] for r in rows], device=device)
        self._ids.index_copy_(0, index, torch.tensor(tokens, device=device)[:, None])

    def step(self, feed: list[int] | None) -> torch.Tensor:
        """One decoding step of the held rows, fed `feed` (one token per batch row), or with None the inputs
        `feed_on_device` and `feed_rows` wrote; logits [rows, vocab], on the device."""
        column, top = self.length, max(self.slots) + 1
        key = (next(b for b in self.row_buckets if b >= top), next(b for b in self.len_buckets if b > column))
        if feed is not None:
            ids = [0] * key[0]
            for slot, token in zip(self.slots, feed, strict=True):
                ids[slot] = token
            self._ids[: key[0], 0].copy_(torch.tensor(ids))
        self._mask[:, 0, 0, column] = True  # free slots too: they attend to a column this step writes
        self._column.fill_(column)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._build(*key)
        run, logits, _ = graph
        if self.capture:
            run.replay()
        else:
            logits = run()
        self._positions.add_(1)
        self.replays += 1
        self.length += 1
        assert logits is not None
        packed = self.slots == list(range(len(self.slots)))
        return logits[: len(self.slots)] if packed else logits.index_select(0, self._index())

    def _build(self, rows: int, length: int) -> tuple[Any, torch.Tensor | None, Any]:
        cache = Cache(layers=[_ColumnLayer(k[:rows, :, :length], v[:rows, :, :length], self._column)
                              for k, v in zip(self._keys, self._values, strict=True)])
        ids, positions, mask = self._ids[:rows], self._positions[:rows], self._mask[:rows, :, :, :length]
        column_positions = self._column_positions[:rows, :length]

        def forward() -> torch.Tensor:
            attention: Any = mask
            if self.attention.window is not None:  # the column this step writes holds the query's own position
                column_positions.index_copy_(1, self._column, positions)
                attention = self.attention.masks(mask, positions[:, :, None, None], column_positions[:, None, None, :])
            out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, cache=cache,
                             use_cache=True)
            return out.logits[:, -1, :]

        if not self.capture:
            return forward, None, cache
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, logits = capture(forward, self._pool)
        self.captures += 1
        log.info("decode graphs: captured %d rows x %d positions (%d graphs)", rows, length, self.captures)
        return graph, logits, cache


def capture(forward: Any, pool: Any) -> tuple[Any, Any]:
    """A CUDA graph of `forward` and the output tensor its replays refill. Warm-up passes on a side stream first
    (cuBLAS workspaces, lazy inits); they write the same buffers a replay overwrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = forward()
    return graph, output
