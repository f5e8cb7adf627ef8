"""CPU_LINEAR: fp32 linear layers on the CPU multiply weight-first (workers/chat/cpu_linear.py) and give what
`F.linear` gives, and the engine on such a model keeps greedy output equal to `generate` on the untouched one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.test_engine import PROMPTS, admit, drain, greedy_ids, job
from workers.chat import cpu_linear
from workers.chat.engine import ChatEngine
from workers.chat.loader import load_causal_lm


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (3, 1, 64), (4, 5, 64), (16, 1, 64), (cpu_linear.ROWS + 1, 64)])
def test_weight_first_product_equals_linear(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 200, bias=bias)
    x = torch.randn(*shape)
    expected = F.linear(x, layer.weight, layer.bias)
    assert cpu_linear.use_weight_first(layer) == 1 and isinstance(layer, torch.nn.Linear)
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == expected.shape == (*shape[:-1], 200)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_loader_switches_plain_fp32_layers_only(tiny_model_dir: Path) -> None:
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    linears = sum(type(m) is torch.nn.Linear for m in plain.modules())
    fp32 = load_causal_lm(str(tiny_model_dir), "cpu", dtype_name="float32").model
    assert sum(type(m) is cpu_linear.WeightFirstLinear for m in fp32.modules()) == linears > 0
    assert fp32.state_dict().keys() == plain.state_dict().keys()
    kept = load_causal_lm(str(tiny_model_dir), "cpu", dtype_name="float32", cpu_linear="torch").model
    bf16 = load_causal_lm(str(tiny_model_dir), "cpu", dtype_name="bfloat16").model
    for model in (kept, bf16):
        assert not any(isinstance(m, cpu_linear.WeightFirstLinear) for m in model.modules())
    with pytest.raises(RuntimeError, match="CPU_LINEAR"):
        cpu_linear.use_weight_first(plain, "mkl")


def test_engine_on_weight_first_layers_equals_generate(tiny_model_dir: Path) -> None:
    """Four requests arriving together and one per step, on a model loaded as the worker loads it, against
    greedy `generate` on the model as transformers loads it."""
    reference = (AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                 AutoTokenizer.from_pretrained(tiny_model_dir))
    loaded = load_causal_lm(str(tiny_model_dir), "cpu", dtype_name="float32")
    assert isinstance(loaded.model.lm_head, cpu_linear.WeightFirstLinear)
    for join_every in (0, 1):
        engine = ChatEngine(loaded.model, loaded.tokenizer, loaded.device, 4096, max_batch_size=8)
        results: dict[str, list] = {}
        seqs = []
        for i, prompt in enumerate(PROMPTS):
            seqs.append(admit(engine, job(prompt, str(i), max_tokens=16)))
            for _ in range(join_every):
                drain(engine, results)
        while engine.active:
            drain(engine, results)
        for prompt, seq in zip(PROMPTS, seqs, strict=True):
            assert seq.output_ids == greedy_ids(reference, prompt, 16)
