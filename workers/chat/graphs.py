"""Decoding steps as replayed CUDA graphs over static KV buffers.

An eager decoding step of a 1B Llama launches ~500 small kernels, and on a GPU the step is bound by launching
them from Python, not by the GPU (bench/RESULTS.md). A CUDA graph replays the whole forward pass with one launch,
but it needs every tensor at a fixed address and shape. So the running batch's keys and values are copied into
buffers of MAX_BATCH_SIZE rows x GRAPH_MAX_LEN positions, allocated once, and each step writes its new column in
place. One graph is captured per bucket of batch rows x cached length, all of them at the worker's warm-up
(`capture_all`; a bucket still missing is captured when first needed); every bucket is a view of the same
buffers, so moving to a longer bucket as the sequences grow copies nothing.
Rows past the live ones are padding that attends to one zero position.

The engine's own cache stays the truth whenever the batch changes (a sequence joins or leaves): the buffers are
copied out before and in again after, once per change, not per step. Contexts longer than GRAPH_MAX_LEN, and
batches larger than the buffers, decode eagerly as before; so do models the static path would compute wrongly
(`unsupported`: attention other than SDPA, a sliding window shorter than GRAPH_MAX_LEN).

On a CPU the same static path runs without capture (DECODE_GRAPHS=on): the tests check it against `generate` and
that a step makes no host synchronisation, which would break capture on a GPU.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

log = logging.getLogger("axion.worker.graphs")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MIN_LEN_BUCKET = 128


class _ColumnLayer(CacheLayerMixin):
    """One layer's static keys and values; `update` writes the step's column at the shared `column` index."""

    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.column = keys, values, column
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        self.keys.index_copy_(2, self.column, key_states)
        self.values.index_copy_(2, self.column, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        assert self.keys is not None
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        assert self.keys is not None
        return self.keys.shape[2]


def unsupported(config: Any, max_len: int) -> str | None:
    """Why the static path would not compute what the model computes, or None when it does.

    It hands every layer one boolean [rows, 1, 1, length] mask, as SDPA takes it: an eager attention adds the
    mask to its scores, and a sliding layer whose window is shorter than the buffers would look past it (Gemma 2
    and 3 and Mistral gave other tokens than `generate` with a window of 8; tests/test_decode_graphs.py)."""
    attention = getattr(config, "_attn_implementation", None)
    if attention != "sdpa":
        return f"attention {attention!r}, not sdpa"
    types = set(getattr(config, "layer_types", None) or [])
    if not types <= {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(types)}"
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in types or (not types and window)
    if sliding and window and window < max_len:
        return f"sliding window {window} < GRAPH_MAX_LEN {max_len}"
    return None


def buckets(limit: int, sizes: tuple[int, ...]) -> list[int]:
    return sorted({s for s in sizes if s < limit} | {limit})


class GraphDecoder:
    """Static buffers and one captured graph per (rows, length) bucket; `capture=False` replays eagerly (CPU)."""

    def __init__(self, model: Any, max_rows: int, max_len: int, capture: bool) -> None:
        self.model = model
        self.capture = capture
        self.max_rows, self.max_len = max_rows, max_len
        self.row_buckets = buckets(max_rows, BATCH_BUCKETS)
        self.len_buckets = buckets(max_len, tuple(MIN_LEN_BUCKET << i for i in range(16)))
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._graphs: dict[tuple[int, int], tuple[Any, torch.Tensor | None, Any]] = {}
        self._pool: Any = None
        self.rows = 0  # live rows held in the buffers; 0 = the engine's cache is the truth
        self.length = 0  # cached positions held in the buffers
        self.captures = 0
        self.replays = 0

    def fits(self, rows: int, cached: int) -> bool:
        return rows <= self.max_rows and cached + 1 <= self.max_len

    @property
    def holding(self) -> bool:
        return self.rows > 0

    def _allocate(self, like: torch.Tensor, layers: int) -> None:
        device, dtype = like.device, like.dtype
        shape = (self.max_rows, like.shape[1], self.max_len, like.shape[3])
        # Zeros, not empty: masked positions still enter SDPA's weighted sum (with weight 0), and 0 * NaN is NaN.
        self._keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self._values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self._ids = torch.zeros((self.max_rows, 1), dtype=torch.long, device=device)
        self._positions = torch.zeros((self.max_rows, 1), dtype=torch.long, device=device)
        self._mask = torch.zeros((self.max_rows, 1, 1, self.max_len), dtype=torch.bool, device=device)
        self._column = torch.zeros(1, dtype=torch.long, device=device)
        gib = 2 * layers * self._keys[0].numel() * self._keys[0].element_size() / 2**30
        log.info("decode graphs: KV buffers for %d rows x %d positions (%.2f GiB), %s", self.max_rows, self.max_len,
                 gib, "CUDA graphs" if self.capture else "eager (no capture)")

    def capture_all(self) -> int:
        """Capture every bucket now (the worker's warm-up), not the first time a batch needs it: a capture runs
        the forward pass three times, eagerly, and lazily each one stalled the whole batch for 0.15-0.9 s on
        the H100 of bench/RESULTS.md. Without capture (CPU) it builds the buckets' eager steps. Returns the
        number of buckets built."""
        if self.holding:
            return 0
        if not self._keys:
            config = self.model.config
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            param = next(self.model.parameters())
            like = torch.empty((1, config.num_key_value_heads, 1, head_dim), dtype=param.dtype, device=param.device)
            self._allocate(like, config.num_hidden_layers)
        self._mask.zero_()
        self._mask[:, 0, 0, 0] = True  # the warm-up passes attend to one zero position: finite keys and values
        before = len(self._graphs)
        for rows in self.row_buckets:
            for length in self.len_buckets:
                if (rows, length) not in self._graphs:
                    self._graphs[(rows, length)] = self._build(rows, length)
        for buffer in self._keys + self._values:
            buffer.zero_()
        return len(self._graphs) - before

    def load(self, cache: Any, mask: torch.Tensor) -> None:
        """Copy the engine's batch (cache [rows, heads, len, dim] per layer, 2D mask [rows, len]) into the buffers."""
        rows, length = mask.shape
        layers = cache.layers
        if not self._keys:
            self._allocate(layers[0].keys, len(layers))
        for layer, keys, values in zip(layers, self._keys, self._values, strict=True):
            keys[:rows, :, :length].copy_(layer.keys)
            values[:rows, :, :length].copy_(layer.values)
        self._mask.zero_()
        self._mask[:rows, 0, 0, :length] = mask.bool()
        self._mask[rows:, 0, 0, 0] = True  # padding rows attend to one (zero) position: no all-masked softmax
        self.rows, self.length = rows, length

    def discard(self) -> None:
        """Forget the held batch (it finished or failed as a whole): nothing to copy back."""
        self.rows = self.length = 0

    def unload(self, cache: Any) -> None:
        """Give the engine its batch back (copies: the buffers are reused by the next batch)."""
        rows, length = self.rows, self.length
        for layer, keys, values in zip(cache.layers, self._keys, self._values, strict=True):
            layer.keys = keys[:rows, :, :length].clone()
            layer.values = values[:rows, :, :length].clone()
        self.discard()

    def held_bytes(self) -> int:
        if not self.holding:
            return 0
        per_row_position = sum(k.shape[1] * k.shape[3] * k.element_size() for k in self._keys + self._values)
        return self.rows * self.length * per_row_position

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decoding step of the held rows (`ids`, `positions`: [rows, 1]); logits [rows, vocab]."""
        rows, column = self.rows, self.length
        self._ids[:rows].copy_(ids)
        self._positions[:rows].copy_(positions)
        self._mask[:rows, 0, 0, column] = True
        self._column.fill_(column)
        key = (next(b for b in self.row_buckets if b >= rows), next(b for b in self.len_buckets if b > column))
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._build(*key)
        run, logits, _ = graph
        if self.capture:
            run.replay()
        else:
            logits = run()
        self.replays += 1
        self.length += 1
        assert logits is not None
        return logits[:rows]

    def _build(self, rows: int, length: int) -> tuple[Any, torch.Tensor | None, Any]:
        cache = Cache(layers=[_ColumnLayer(k[:rows, :, :length], v[:rows, :, :length], self._column)
                              for k, v in zip(self._keys, self._values, strict=True)])
        ids, positions, mask = self._ids[:rows], self._positions[:rows], self._mask[:rows, :, :, :length]

        def forward() -> torch.Tensor:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            return out.logits[:, -1, :]

        if not self.capture:
            return forward, None, cache
        # Warm-up on a side stream first (cuBLAS workspaces, lazy inits), then capture. The warm-up writes the
        # step's own column, which the replay right after overwrites.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = forward()
        self.captures += 1
        log.info("decode graphs: captured %d rows x %d positions (%d graphs)", rows, length, self.captures)
        return graph, logits, cache
