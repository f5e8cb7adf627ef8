"""Which backend a chat worker uses (BACKEND=auto|vllm|max|external|native), and why.

`auto` takes an external engine attached by EXTERNAL_ENGINE_URL; else vLLM in the worker's process when vLLM is
installed, the device is CUDA and vLLM knows the model's architecture; else the native engine. `vllm` asks for
vLLM on any device (its CPU build included); `max` and `external` spawn EXTERNAL_ENGINE_CMD (Modular's MAX by
default). The reason travels with the choice: it is logged and shown in /health, /v1/models and `axion models`.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from common.settings import Settings

REPO = Path(__file__).resolve().parents[2]

# The text-generation `architectures` in MAX 26.7.0's pipeline registry (max/pipelines/architectures/*/arch.py;
# speculative-decoding drafts left out). Mixtral, Gemma 1-2 and Phi 1-2 are not in this version's registry.
MAX_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "Llama4ForCausalLM", "Llama4ForConditionalGeneration", "MistralForCausalLM",
    "Mistral3ForConditionalGeneration", "Qwen2ForCausalLM", "Qwen2_5_VLForConditionalGeneration", "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM", "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
    "Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration",
    "Gemma4ForConditionalGeneration", "Phi3ForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM",
    "DeepseekV32ForCausalLM", "DeepseekV4ForCausalLM", "GptOssForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM",
    "Olmo2ForCausalLM", "Olmo3ForCausalLM", "Lfm2ForCausalLM", "MambaForCausalLM", "NemotronHForCausalLM",
    "MiniMaxM2ForCausalLM", "MiMoV2ForCausalLM", "GlmMoeDsaForCausalLM", "KimiK25ForConditionalGeneration",
    "KimiVLForConditionalGeneration", "Idefics3ForConditionalGeneration", "LlavaForConditionalGeneration",
    "LagunaForCausalLM", "HYV3ForCausalLM", "Step3p5ForCausalLM",
})
# For a config.json without `architectures`.
MAX_MODEL_TYPES = frozenset({
    "llama", "llama4", "mistral", "mistral3", "qwen2", "qwen3", "qwen3_moe", "gemma3", "phi3", "deepseek_v2",
    "deepseek_v3", "gpt_oss", "granite", "olmo", "olmo2", "olmo3", "lfm2", "mamba",
})


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # "native", "vllm" or "external"
    reason: str
    command: list[str] | None = None  # the engine's command line (placeholders unfilled), when spawned
    url: str | None = None  # the engine's base URL, when attached


def is_max_command(argv: list[str]) -> bool:
    return bool(argv) and Path(argv[0]).name == "max"


def resolve_command(template: str) -> list[str] | None:
    """The engine's argv with its program found (PATH, then the repo's .venv-max for `max`), or None."""
    argv = shlex.split(template)
    if not argv:
        return None
    found = shutil.which(argv[0])
    if found is None and argv[0] == "max" and (REPO / ".venv-max/bin/max").exists():
        found = str(REPO / ".venv-max/bin/max")
    return [found, *argv[1:]] if found else None


def architecture(model: str) -> tuple[list[str], str]:
    """The `architectures` and `model_type` of a local model folder's config.json (empty when unreadable)."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return [], ""
    return list(config.get("architectures") or []), str(config.get("model_type") or "")


def max_supports(model: str) -> tuple[bool, str]:
    archs, model_type = architecture(model)
    if not archs and not model_type:
        return False, f"no readable config.json in {model!r}"
    name = ",".join(archs) or model_type
    if any(a in MAX_ARCHITECTURES for a in archs) or (not archs and model_type in MAX_MODEL_TYPES):
        return True, f"architecture {name} is supported by MAX"
    return False, f"architecture {name} is not on MAX's list"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cuda_device(settings: Settings) -> bool:
    if settings.device not in ("auto", "cuda"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def vllm_problem(settings: Settings, model: str) -> str | None:
    """Why vLLM cannot serve `model` as configured (None when it can)."""
    if not vllm_installed():
        return "vLLM is not installed (make vllm)"
    if settings.quantization != "none" or settings.model_gguf_file or model.endswith(".gguf"):
        return "QUANTIZATION and GGUF files are the native engine's"
    archs, _ = architecture(model)
    if archs:
        from vllm import ModelRegistry

        if not any(a in ModelRegistry.get_supported_archs() for a in archs):
            return f"vLLM does not know the architecture {','.join(archs)}"
    return None


def choose_backend(settings: Settings, model: str | None = None) -> BackendChoice:
    model = model or settings.model_name
    if settings.backend == "native":
        return BackendChoice("native", "BACKEND=native")
    if settings.backend == "vllm":
        problem = vllm_problem(settings, model)
        return BackendChoice("native", f"BACKEND=vllm, but {problem}") if problem else \
            BackendChoice("vllm", "BACKEND=vllm")
    if settings.external_engine_url:
        return BackendChoice("external", f"BACKEND={settings.backend}, EXTERNAL_ENGINE_URL is set",
                             url=settings.external_engine_url.rstrip("/"))
    if settings.backend == "auto":
        if not cuda_device(settings):
            return BackendChoice("native", "BACKEND=auto: no CUDA device, the native engine serves CPUs")
        problem = vllm_problem(settings, model)
        if problem:
            return BackendChoice("native", f"BACKEND=auto: {problem}")
        return BackendChoice("vllm", "BACKEND=auto: vLLM is installed and the device is CUDA")
    command = resolve_command(settings.external_engine_cmd)
    if command is None:
        program = (shlex.split(settings.external_engine_cmd) or ["(empty)"])[0]
        return BackendChoice("native", f"the engine command {program!r} is not installed")
    if settings.backend == "max" and is_max_command(command):
        supported, why = max_supports(model)
        return BackendChoice("external" if supported else "native", f"BACKEND=max: {why}",
                             command=command if supported else None)
    return BackendChoice("external", f"BACKEND={settings.backend}", command=command)
