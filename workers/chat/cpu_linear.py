"""Linear layers that multiply weight-first on the CPU, where MKL's small-batch products are slow the usual way.

`F.linear(x, W)` asks MKL for X·Wᵀ, which for a decoding batch of a few rows is far slower than the same product
written (W·Xᵀ)ᵀ, with the same values. Only plain fp32 weights of at least MIN_ELEMENTS on the CPU are switched
(bf16 goes through oneDNN, quantized weights bring their own kernels; small layers lose to the extra ops), and only
up to ROWS rows (long prefills gain little); outputs up to CONTIGUOUS_ROWS rows are made contiguous.
`CPU_LINEAR=torch` keeps `F.linear`. The timings behind each threshold: docs/design/cpu-linear.md.
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
    time, when that is under `gain` x the time at r itself. MKL's time is far from monotonic in the rows and the
    fast counts depend on the CPU, so they are timed here once per model, while `budget_s` lasts; a padded count
    is timed twice and the faster kept, so a busy moment at start does not pad it for the worker's life
    (docs/design/cpu-linear.md)."""
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
