"""QUANTIZATION and GGUF loading through the real loader (workers/chat/loader.py), on models built here."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.settings import SettingsError, load_settings
from workers.chat.loader import gguf_source, load_causal_lm
from workers.chat.quantize import weight_bytes

# The medium benchmark model's proportions (bench/serve_bench.py MEDIUM: hidden 512, 8 layers, MLP 1376, 32000
# tokens) at a quarter of the width and vocabulary: embeddings are the same ~29 % of the parameters, so the share
# that int8 cannot shrink, and with it the ratio, is the same.
SCALED_MEDIUM = {"hidden_size": 128, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 344,
                 "vocab_size": 8000}


@pytest.fixture(scope="module")
def scaled_medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from devtools.chat_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("quant") / "scaled-medium", **SCALED_MEDIUM)


def test_int8_weights_take_under_55_percent(scaled_medium: Path) -> None:
    plain = load_causal_lm(str(scaled_medium), "cpu", dtype_name="float32")
    int8 = load_causal_lm(str(scaled_medium), "cpu", dtype_name="float32", quantization="int8")
    before, after = weight_bytes(plain.model), weight_bytes(int8.model)
    ratio = after / before
    print(f"weights: float32 {before / 2**20:.2f} MiB, int8 {after / 2**20:.2f} MiB, ratio {ratio:.3f} "
          f"({1 - ratio:.1%} less)")
    assert before == sum(p.numel() * 4 for p in plain.model.parameters())
    assert ratio <= 0.55
    linear = type(int8.model.model.layers[0].mlp.down_proj.weight).__name__
    assert linear != "Parameter" and "Int8" in linear, linear


def test_int4_on_cpu_is_refused_with_the_reason(scaled_medium: Path) -> None:
    with pytest.raises(RuntimeError, match="int4 needs a CUDA device"):
        load_causal_lm(str(scaled_medium), "cpu", dtype_name="float32", quantization="int4")


def test_quantization_setting_is_validated() -> None:
    assert load_settings({"QUANTIZATION": "int8"}).quantization == "int8"
    assert load_settings({}).quantization == "none"
    with pytest.raises(SettingsError, match="QUANTIZATION"):
        load_settings({"QUANTIZATION": "int3"})


def test_a_gguf_model_name_splits_into_folder_and_file(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    assert gguf_source(str(path), None) == (str(tmp_path), "m.gguf")
    assert gguf_source(str(tmp_path), "m.gguf") == (str(tmp_path), "m.gguf")
    assert gguf_source("Qwen/Qwen3-0.6B", None) == ("Qwen/Qwen3-0.6B", None)
