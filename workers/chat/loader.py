"""Pick the device and load a causal LM and its tokenizer, by hub id or local folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger("axion.worker.loader")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


def pick_device(preference: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA (bf16) → MPS (fp16) → CPU (fp32) for `auto`; an explicit choice that is missing is an error."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("DEVICE=cuda was asked for but torch sees no CUDA device")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda"), dtype
    mps = getattr(torch.backends, "mps", None)
    if preference == "mps" or (preference == "auto" and mps is not None and mps.is_available()):
        if mps is None or not mps.is_available():
            raise RuntimeError("DEVICE=mps was asked for but torch sees no MPS device")
        return torch.device("mps"), torch.float16
    return torch.device("cpu"), torch.float32


def load_causal_lm(name: str, preference: str = "auto") -> LoadedModel:
    device, dtype = pick_device(preference)
    log.info("loading model %s on %s (%s)", name, device, str(dtype).removeprefix("torch."))
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"the tokenizer of {name} has no chat template; chat completions need one")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    return LoadedModel(model, tokenizer, device, dtype)
