"""DTYPE: what `auto` picks on the CPU, and the engine in bf16 against bf16 `generate` on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.protocol import Finished
from tests.test_engine import PROMPTS, admit, drain, greedy_ids, job
from workers.chat import loader
from workers.chat.engine import ChatEngine


@pytest.mark.parametrize(("amx", "asked", "expected"), [
    (True, "auto", torch.bfloat16), (False, "auto", torch.float32),
    (True, "float32", torch.float32), (False, "bfloat16", torch.bfloat16), (False, "float16", torch.float16)])
def test_cpu_dtype(monkeypatch: pytest.MonkeyPatch, amx: bool, asked: str, expected: torch.dtype) -> None:
    monkeypatch.setattr(loader, "cpu_has_amx", lambda: amx)
    assert loader.pick_device("cpu", asked) == (torch.device("cpu"), expected)


def test_auto_on_this_cpu_follows_its_amx() -> None:
    expected = torch.bfloat16 if "amx_bf16" in Path("/proc/cpuinfo").read_text() else torch.float32
    assert loader.pick_device("cpu", "auto")[1] == expected


def test_bf16_engine_equals_bf16_generate(tiny_model_dir: Path) -> None:
    """Loaded by the worker's own loader in bf16: weights, KV cache and steps all in bf16, and a lone greedy
    request gives what `generate` gives on the same bf16 model."""
    loaded = loader.load_causal_lm(str(tiny_model_dir), "cpu", dtype_name="bfloat16")
    assert loaded.dtype == torch.bfloat16 and next(loaded.model.parameters()).dtype == torch.bfloat16
    engine = ChatEngine(loaded.model, loaded.tokenizer, loaded.device, 4096)
    for i, prompt in enumerate(PROMPTS[:2]):
        seq = admit(engine, job(prompt, str(i), max_tokens=16))
        results: dict[str, list] = {}
        while engine.active:
            drain(engine, results)
        assert isinstance(results[str(i)][-1], Finished)
        assert seq.output_ids == greedy_ids((loaded.model, loaded.tokenizer), prompt, 16)


def test_served_in_bf16(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`axion serve` with DTYPE=bfloat16: /health says bfloat16 and a streamed greedy answer, through the API,
    Redis and the worker, is what bf16 `generate` gives."""
    from tests.engine_helpers import chat_worker_info, start_front

    front = start_front(tiny_model_dir, tmp_path, "serve-bf16", BACKEND="native", DTYPE="bfloat16")
    try:
        assert chat_worker_info(front)["dtype"] == "bfloat16"
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        expected = tokenizer.decode(greedy_ids((model, tokenizer), PROMPTS[1], 20), skip_special_tokens=True)
        stream = front.client().chat.completions.create(
            model=front.model, messages=[{"role": "user", "content": PROMPTS[1]}], temperature=0, max_tokens=20,
            stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected
    finally:
        front.procs[0].stop()
