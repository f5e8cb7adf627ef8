"""Linear layers that multiply weight-first on the CPU, where MKL's small-batch products are slow the usual way.

`F.linear(x, W)` asks MKL for X·Wᵀ; for one row it takes MKL's matrix-vector kernel. For a decoding batch of a
few rows both are far slower than the same product written (W·Xᵀ)ᵀ, which gives the same values: timed on a
2-vCPU AMD EPYC (AVX-512, torch 2.13 CPU) over the medium benchmark model's five weight shapes (output head
included), one product each:

| rows | X·Wᵀ | (W·Xᵀ)ᵀ |
|--:|--:|--:|
| 1 | 4.1 ms | 1.5 ms (a zero row added by the plan: MKL runs one row as a vector product either way round) |
| 2 | 8.5 ms | 1.6 ms |
| 4 | 6.8 ms | 1.7 ms |
| 8 | 7.0 ms | 3.3 ms |
| 16 | 7.6 ms | 5.8 ms |
| 64 | 15.1 ms | 14.2 ms |

The engine's decoding step took 11.4-12.4 -> 6.5-7.2 ms at 1 row, 19-20 -> 7.6 ms at 4, 23-25 -> 20 ms at 16 and,
with the row plan (`plan_rows`), 28-33 -> 19.6-20.4 ms at 13-15 (bench/RESULTS.md, session 10), with every
greedy token unchanged. Above ROWS (prefills of long prompts) the
large products gain little while their transposed outputs would slow what reads them: they keep `F.linear`. Up
to CONTIGUOUS_ROWS the output is made contiguous (the step at 4 rows: 7.4-7.8 ms against 9.0-9.4 as a view, the
ops after it read it faster); above, it stays a transposed view, as the copy costs more (16 rows: 20.4-20.9 ms
contiguous, 19.7-20.4 as a view).

Layers of fewer than MIN_ELEMENTS weights (512x256) are not switched: there the few extra small ops cost more than
the kernel saves (a 64x64 layer, 2 rows: 5.9 us with F.linear, 9.2 weight-first; the tests' tiny model generated
17% slower switched), while every layer of the medium model (the smallest 256x512) gains in place: its step at one
row took 12.6-15.9 ms unswitched, 9.7-10.9 with only the output head switched, 7.3-7.8 with all.

Only plain fp32 weights on the CPU are switched: bf16 on the CPU goes through oneDNN, not these MKL kernels, and
quantized weights (torchao tensor subclasses) bring their own kernels. `CPU_LINEAR=torch` keeps `F.linear`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("axion.worker.loader")

ROWS = 256
CONTIGUOUS_ROWS = 8
MIN_ELEMENTS = 1 << 17
PLAN_ROWS = 64  # row counts measured at load at most (decoding batches); above, multiplied as they come
PLAN_BUDGET_S = 4.0
MODES = ("auto", "torch")


class WeightFirstLinear(torch.nn.Linear):
    """An `nn.Linear` whose products of 1..ROWS rows run as (W·Xᵀ)ᵀ; modules become it by a class swap, so
    their parameters, state dict and `isinstance` checks stay those of the original layer. `pad_to[rows]` (shared
    by a model's layers, from `plan_rows`) is the row count to multiply at: zero rows are added, and dropped after."""

    pad_to: tuple[int, ...] = ()  # no plan: every row count as it comes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x.shape[-1]
        rows = x.numel() // features if features else 0
        if rows < 1 or rows > ROWS:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, features)
        padded = self.pad_to[rows] if rows < len(self.pad_to) else rows
        if padded > rows:
            flat = torch.cat([flat, flat.new_zeros(padded - rows, features)])
        out = torch.mm(self.weight, flat.t()).t()[:rows]
        if rows <= CONTIGUOUS_ROWS:
            out = out.contiguous()
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])


def switchable(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module) is torch.nn.Linear and type(weight) is torch.nn.Parameter
            and weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() >= MIN_ELEMENTS)


def use_weight_first(model: Any, mode: str = "auto", batch_rows: int = PLAN_ROWS) -> int:
    """Switch `model`'s plain fp32 CPU linear layers to WeightFirstLinear (`auto`), with the row counts up to
    `batch_rows` (the decoding batch, MAX_BATCH_SIZE) planned; how many layers were switched."""
    if mode not in MODES:
        raise RuntimeError(f"unknown CPU_LINEAR={mode!r}; one of {', '.join(MODES)}")
    if mode == "torch":
        return 0
    layers = [module for module in model.modules() if switchable(module)]
    if layers:
        start = time.perf_counter()
        pad_to = plan_rows([layer.weight for layer in layers], min(batch_rows, PLAN_ROWS))
        for layer in layers:
            layer.__class__ = WeightFirstLinear
            layer.pad_to = pad_to
        padded = ", ".join(f"{rows}->{to}" for rows, to in enumerate(pad_to) if to != rows)
        log.info("CPU_LINEAR: %d linear layers multiply weight-first; rows planned up to %d in %.1f s, padded: %s",
                 len(layers), len(pad_to) - 1, time.perf_counter() - start, padded or "none")
    return len(layers)


def plan_rows(weights: list[torch.Tensor], limit: int = PLAN_ROWS, gain: float = 0.9,
              budget_s: float = PLAN_BUDGET_S) -> tuple[int, ...]:
    """`pad_to[r]` for r = 0..limit: the row count at most 2r whose products over all these weights take least
    time, when that is under `gain` x the time at r itself. Row counts are measured from 1 up while `budget_s`
    lasts (a large model gets its small batches planned); the others are multiplied as they come.

    MKL's time is far from monotonic in the rows: in the medium model's decoding step 13-15 rows took 28-33 ms
    and 16 rows 20 ms (bench/RESULTS.md, session 10); one row runs as a slow vector product. Where the fast row
    counts fall depends on the CPU and the MKL build, so they are measured here, once per model: 5.4-5.5 s for
    the medium model up to 64 rows on 2 vCPUs (3.3 s of them the first pass), well under a second up to 16. Every
    weight is multiplied in turn, as in a forward pass, so each comes from memory as it does in a step: timing one
    weight per shape over and over (from cache) found one row faster as a vector product, which in a step it is
    not.

    Every row count the first pass pads is timed again once the pass is done, and the faster of its two times
    counts: a busy moment (the API process starting beside the worker) only ever adds time, and a row count it
    made look slow would otherwise be padded for the worker's life. One server of ~20 in session 11 ran its
    16-row steps at 28 ms instead of 22 (505 against ~600 tokens/s at C=16); padding 16 rows to 32 in the engine
    alone reproduced it (27.2 ms against 20.0)."""
    _seconds(weights, 2)  # first-call costs
    cost, deadline = [0.0], time.monotonic() + budget_s
    while len(cost) <= limit and time.monotonic() < deadline:
        cost.append(_seconds(weights, len(cost)))
    for rows, padded in enumerate(_choose(cost, gain)):
        if padded != rows:
            cost[rows] = min(cost[rows], _seconds(weights, rows))
    return _choose(cost, gain)


def _choose(cost: list[float], gain: float) -> tuple[int, ...]:
    """For each row count, the count up to twice it that costs least, if under `gain` x its own cost."""
    limit = len(cost) - 1
    pad_to = list(range(limit + 1))
    for rows in range(1, limit + 1):
        best = min(range(rows, min(2 * rows, limit) + 1), key=cost.__getitem__)
        if cost[best] < gain * cost[rows]:
            pad_to[rows] = best
    return tuple(pad_to)


@torch.inference_mode()
def _seconds(weights: list[torch.Tensor], rows: int, repeats: int = 2) -> float:
    """The fastest of `repeats` passes of weight-first products over `weights` at `rows` rows (one row is
    measured as MKL runs it)."""
    inputs = {features: torch.zeros(rows, features, dtype=weights[0].dtype)
              for features in {weight.shape[1] for weight in weights}}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for weight in weights:
            torch.mm(weight, inputs[weight.shape[1]].t())
        best = min(best, time.perf_counter() - start)
    return best


@contextlib.contextmanager
def plain_linear(model: Any) -> Iterator[int]:
    """Inside the block `model`'s WeightFirstLinear layers are plain `nn.Linear` again (how many): the benchmark's
    `generate` baselines run on the kernels transformers gives them, not on Axion's."""
    switched: list[torch.nn.Module] = [m for m in model.modules() if type(m) is WeightFirstLinear]
    for module in switched:
        module.__class__ = torch.nn.Linear
    try:
        yield len(switched)
    finally:
        for module in switched:
            module.__class__ = WeightFirstLinear
