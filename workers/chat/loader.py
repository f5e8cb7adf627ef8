"""Pick the device and load a causal LM and its tokenizer, by hub id or local folder, from safetensors or a GGUF
file, optionally with weight-only quantization (workers/chat/quantize.py).

GGUF: MODEL_GGUF_FILE names a .gguf file inside MODEL_NAME (a folder or hub repo), or MODEL_NAME is the path of a
.gguf file. transformers reads the architecture, config and tokenizer from the file and dequantizes its weights
(F32, F16, Q8_0, the K-quants...) to the device dtype at load; tokenizer files next to it win over the GGUF's own
tokenizer, as they carry the chat template exactly as the model's authors wrote it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.chat.cpu_linear import PLAN_ROWS, use_weight_first
from workers.chat.quantize import quantize_weights

log = logging.getLogger("axion.worker.loader")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


def pick_device(preference: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA (bf16, else fp16) → MPS (fp16) → CPU for `auto`; an explicit device that is missing is an error.

    On the CPU `auto` means bf16 only where the cores multiply bf16 tiles natively (Intel AMX): elsewhere bf16 is
    emulated or gains too little for its rounding (bench/RESULTS.md). An explicit DTYPE wins on any device."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("DEVICE=cuda was asked for but torch sees no CUDA device")
        auto = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda"), _dtype(dtype, auto)
    mps = getattr(torch.backends, "mps", None)
    if preference == "mps" or (preference == "auto" and mps is not None and mps.is_available()):
        if mps is None or not mps.is_available():
            raise RuntimeError("DEVICE=mps was asked for but torch sees no MPS device")
        return torch.device("mps"), _dtype(dtype, torch.float16)
    return torch.device("cpu"), _dtype(dtype, torch.bfloat16 if cpu_has_amx() else torch.float32)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles for bf16 (Sapphire Rapids and later Xeons) that torch can use."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def _dtype(name: str, auto: torch.dtype) -> torch.dtype:
    return auto if name == "auto" else getattr(torch, name)


def gguf_source(name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder or repo, GGUF file name or None): a MODEL_NAME that is a .gguf file splits into its folder and name."""
    if gguf_file is None and name.endswith(".gguf") and Path(name).is_file():
        return str(Path(name).parent), Path(name).name
    return name, gguf_file


def load_causal_lm(name: str, preference: str = "auto", *, gguf_file: str | None = None,
                   quantization: str = "none", dtype_name: str = "auto", cpu_linear: str = "auto",
                   batch_rows: int = PLAN_ROWS, attn_implementation: str | None = None) -> LoadedModel:
    """Tokenizer and model of `name` on the device and in the dtype `pick_device` chooses, weights quantized and
    CPU linear layers switched as asked. `attn_implementation` is transformers' (the default when None)."""
    device, dtype = pick_device(preference, dtype_name)
    source, gguf_file = gguf_source(name, gguf_file)
    log.info("loading model %s%s on %s (%s%s)", name, f" ({gguf_file})" if gguf_file else "", device,
             str(dtype).removeprefix("torch."), f", weights {quantization}" if quantization != "none" else "")
    own_tokenizer = gguf_file is not None and not (Path(source) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file if own_tokenizer else None)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"the tokenizer of {name} has no chat template; chat completions need one")
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, gguf_file=gguf_file, **attention)
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides `self`
    quantize_weights(model, quantization, device)
    use_weight_first(model, cpu_linear, batch_rows)
    return LoadedModel(model, tokenizer, device, dtype)
