"""Linear layers that multiply weight-first on the CPU, where MKL's small-batch products are slow the usual way.

`F.linear(x, W)` asks MKL for X·Wᵀ; for one row it takes MKL's matrix-vector kernel. For a decoding batch of a
few rows both are far slower than the same product written (W·Xᵀ)ᵀ, which gives the same values: timed on a
2-vCPU AMD EPYC (AVX-512, torch 2.13 CPU) over the medium benchmark model's five weight shapes (output head
included), one product each:

| rows | X·Wᵀ | (W·Xᵀ)ᵀ |
|--:|--:|--:|
| 1 | 4.1 ms | 1.5 ms (a zero row added: MKL runs one row as a vector product whichever way round) |
| 2 | 8.5 ms | 1.6 ms |
| 4 | 6.8 ms | 1.7 ms |
| 8 | 7.0 ms | 3.3 ms |
| 16 | 7.6 ms | 5.8 ms |
| 64 | 15.1 ms | 14.2 ms |

The engine's decoding step took 11.4-12.4 -> 6.5-7.2 ms at 1 row, 19-20 -> 7.6 ms at 4 and 23-25 -> 20 ms at 16
(bench/RESULTS.md, session 10), with every greedy token unchanged. Above ROWS (prefills of long prompts) the
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
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

ROWS = 256
CONTIGUOUS_ROWS = 8
MIN_ELEMENTS = 1 << 17
MODES = ("auto", "torch")


class WeightFirstLinear(torch.nn.Linear):
    """An `nn.Linear` whose products of 1..ROWS rows run as (W·Xᵀ)ᵀ; modules become it by a class swap, so
    their parameters, state dict and `isinstance` checks stay those of the original layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x.shape[-1]
        rows = x.numel() // features if features else 0
        if rows < 1 or rows > ROWS:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, features)
        if rows == 1:
            flat = torch.cat([flat, flat.new_zeros(1, features)])
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


def use_weight_first(model: Any, mode: str = "auto") -> int:
    """Switch `model`'s plain fp32 CPU linear layers to WeightFirstLinear (`auto`); how many were switched."""
    if mode not in MODES:
        raise RuntimeError(f"unknown CPU_LINEAR={mode!r}; one of {', '.join(MODES)}")
    if mode == "torch":
        return 0
    switched = 0
    for module in model.modules():
        if switchable(module):
            module.__class__ = WeightFirstLinear
            switched += 1
    return switched


@contextlib.contextmanager
def plain_linear(model: Any) -> Iterator[int]:
    """Inside the block `model`'s WeightFirstLinear layers are plain `nn.Linear` again (how many): the benchmark's
    `generate` baselines run on the kernels transformers gives them, not on Axion's."""
    switched = [m for m in model.modules() if type(m) is WeightFirstLinear]
    for module in switched:
        module.__class__ = torch.nn.Linear
    try:
        yield len(switched)
    finally:
        for module in switched:
            module.__class__ = WeightFirstLinear
