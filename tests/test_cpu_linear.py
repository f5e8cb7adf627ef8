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

# The medium benchmark model's width (every layer >= MIN_ELEMENTS weights) with 2 layers and a small vocabulary.
WIDE = {"hidden_size": 512, "num_layers": 2, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 1376,
        "vocab_size": 512}


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from devtools.chat_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("cpu-linear") / "wide", **WIDE)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 512), (1, 1, 512), (2, 512), (3, 1, 512), (4, 5, 512), (16, 1, 512),
                                   (cpu_linear.ROWS + 1, 512)])
def test_weight_first_product_equals_linear(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 300, bias=bias)
    x = torch.randn(*shape)
    expected = F.linear(x, layer.weight, layer.bias)
    assert cpu_linear.use_weight_first(layer) == 1 and isinstance(layer, torch.nn.Linear)
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == expected.shape == (*shape[:-1], 300)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 13])
def test_products_padded_to_a_planned_row_count_equal_linear(rows: int) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 300)
    x = torch.randn(rows, 1, 512)
    expected = F.linear(x, layer.weight, layer.bias)
    cpu_linear.use_weight_first(layer, batch_rows=2)
    layer.pad_to = (0, 2, 2, 8, 4, *range(5, 13), 16, 14, 15)  # 3 -> 8 and 13 -> 16, zero rows added
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_plan_pads_only_to_measurably_faster_row_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Costs shaped like MKL's on the medium model's shapes (ms): one row slow, 12-15 slower than 16."""
    cost = {1: 4.1, 2: 1.6, 3: 2.0, 4: 1.7, 5: 2.3, 6: 2.9, 7: 3.7, 8: 3.4, 9: 3.8, 10: 4.6, 11: 5.3, 12: 8.0,
            13: 10.2, 14: 10.0, 15: 12.4, 16: 6.2, 17: 8.6, 18: 8.5}
    monkeypatch.setattr(cpu_linear, "_seconds", lambda weights, rows: cost[rows])
    pad_to = cpu_linear.plan_rows([torch.zeros(2, 4)], limit=18)
    assert pad_to[1] == 2 and pad_to[2] == 2  # the slow vector product
    assert [pad_to[r] for r in (12, 13, 14, 15)] == [16, 16, 16, 16]
    assert pad_to[3] == 4  # 1.7 < 0.9 x 2.0
    assert pad_to[7] == 7 and pad_to[9] == 9  # 8 rows at 3.4 is not under 0.9 x 3.7; nothing beats 9 up to 18
    assert pad_to[17] == 17 and pad_to[18] == 18  # nothing faster within 2r and the limit
    assert all(r <= pad_to[r] <= 2 * r for r in range(1, 19))


def test_plan_times_a_padded_row_count_again_and_keeps_the_faster_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Costs rising with the rows, but a busy moment during the first pass made 16 rows look slow: the worker would
    have padded 16 rows for its life. The second look at 16 finds it as fast as its neighbours, and 16 stays 16.
    A row count that is slow on both looks (12) stays padded."""
    looks: dict[int, list[float]] = {12: [30.0, 30.0], 16: [40.0, 16.0]}
    asked: list[int] = []

    def seconds(weights: list[torch.Tensor], rows: int) -> float:
        asked.append(rows)
        times = looks.get(rows)
        return float(rows) if times is None else times.pop(0)

    monkeypatch.setattr(cpu_linear, "_seconds", seconds)
    pad_to = cpu_linear.plan_rows([torch.zeros(2, 4)], limit=32)
    assert pad_to[16] == 16 and pad_to[12] == 13
    assert [r for r in range(1, 33) if pad_to[r] != r] == [12]
    assert asked.count(16) == 2 and asked.count(12) == 2 and asked.count(13) == 1  # only padded counts looked at again


def test_loader_switches_large_plain_fp32_layers_only(wide_model_dir: Path, tiny_model_dir: Path) -> None:
    plain = AutoModelForCausalLM.from_pretrained(wide_model_dir)
    linears = sum(type(m) is torch.nn.Linear for m in plain.modules())
    fp32 = load_causal_lm(str(wide_model_dir), "cpu", dtype_name="float32").model
    assert sum(type(m) is cpu_linear.WeightFirstLinear for m in fp32.modules()) == linears > 0
    assert fp32.state_dict().keys() == plain.state_dict().keys()
    kept = load_causal_lm(str(wide_model_dir), "cpu", dtype_name="float32", cpu_linear="torch").model
    bf16 = load_causal_lm(str(wide_model_dir), "cpu", dtype_name="bfloat16").model
    tiny = load_causal_lm(str(tiny_model_dir), "cpu", dtype_name="float32").model  # 64-wide: below MIN_ELEMENTS
    for model in (kept, bf16, tiny):
        assert not any(isinstance(m, cpu_linear.WeightFirstLinear) for m in model.modules())
    with pytest.raises(RuntimeError, match="CPU_LINEAR"):
        cpu_linear.use_weight_first(plain, "mkl")


def test_plain_linear_undoes_the_switch_inside_its_block(wide_model_dir: Path) -> None:
    model = load_causal_lm(str(wide_model_dir), "cpu", dtype_name="float32").model
    switched = [m for m in model.modules() if type(m) is cpu_linear.WeightFirstLinear]
    with cpu_linear.plain_linear(model) as count:
        assert count == len(switched) > 0
        assert all(type(m) is torch.nn.Linear for m in switched)
    assert all(type(m) is cpu_linear.WeightFirstLinear for m in switched)


def test_engine_on_weight_first_layers_equals_generate(wide_model_dir: Path) -> None:
    """Four requests alone (one row: padded where the plan measured that faster), arriving together, and one per
    step, on a model loaded as the worker loads it, against greedy `generate` on the model as transformers loads
    it. Padded products at set row counts are checked above, whatever this machine's plan."""
    reference = (AutoModelForCausalLM.from_pretrained(wide_model_dir).eval(),
                 AutoTokenizer.from_pretrained(wide_model_dir))
    loaded = load_causal_lm(str(wide_model_dir), "cpu", dtype_name="float32")
    assert isinstance(loaded.model.lm_head, cpu_linear.WeightFirstLinear)
    expected = [greedy_ids(reference, prompt, 16) for prompt in PROMPTS]
    for join_every in (None, 0, 1):
        engine = ChatEngine(loaded.model, loaded.tokenizer, loaded.device, 4096, max_batch_size=8)
        results: dict[str, list] = {}
        seqs = []
        for i, prompt in enumerate(PROMPTS):
            seqs.append(admit(engine, job(prompt, str(i), max_tokens=16)))
            for _ in range(join_every or 0):
                drain(engine, results)
            while join_every is None and engine.active:
                drain(engine, results)
        while engine.active:
            drain(engine, results)
        assert [seq.output_ids for seq in seqs] == expected, join_every
