"""Weight-only quantization of a loaded model (QUANTIZATION=int8|int4) with torchao, and what weights really weigh.

torchao's `quantize_` swaps every `nn.Linear` weight (the output head included) for a tensor subclass that holds
int8 (or packed int4) values plus per-row or per-group scales, and dequantizes inside the matmul; embeddings and
norms keep the model dtype. Measured with torchao 0.18 on CPU torch 2.13: int8 (per row) works on CPU and CUDA;
torchao's int4 layouts need CUDA (the CPU ones need kernels the PyPI wheel does not ship, or keep one int4 value
per byte, which saves nothing over int8), so int4 on CPU is refused at start instead of silently saving nothing.

Installed, torchao is imported by every `import transformers` model load (its quantizer module imports it
eagerly): about 2 s of a worker's start on two busy cores. `keep_torchao_out` spares workers that do not quantize.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

MODES = ("none", "int8", "int4")


def keep_torchao_out() -> None:
    """Make torchao invisible to transformers in this process (call before transformers is imported): its
    availability check then finds no module and skips the eager import. Only for processes that never quantize."""
    sys.modules.setdefault("torchao", None)  # type: ignore[arg-type]


def quantize_weights(model: Any, mode: str, device: torch.device) -> Any:
    """Quantize `model`'s linear weights in place; raise RuntimeError with a readable reason when impossible."""
    if mode == "none":
        return model
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise RuntimeError(f"QUANTIZATION={mode} needs torchao, a dependency of axion ({exc})") from None
    if mode == "int8":
        config: Any = Int8WeightOnlyConfig()
    elif mode == "int4":
        if device.type != "cuda":
            raise RuntimeError("QUANTIZATION=int4 needs a CUDA device: torchao's packed int4 weights have no CPU "
                               "kernels in its PyPI wheel (QUANTIZATION=int8 works on CPU)")
        config = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    else:
        raise RuntimeError(f"unknown QUANTIZATION={mode!r}; one of {', '.join(MODES)}")
    quantize_(model, config)
    return model


def weight_bytes(model: Any) -> int:
    """Bytes held by the parameters, counting a quantized tensor by what it stores (values, scales, zero points)
    rather than by `numel() * element_size()` of the dtype it pretends to be."""
    return sum(_tensor_bytes(p) for p in model.parameters())


def _tensor_bytes(t: torch.Tensor) -> int:
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = flatten()
    return sum(_tensor_bytes(inner) for name in names if (inner := getattr(t, name, None)) is not None)
