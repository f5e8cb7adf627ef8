"""Sliding-window families (Gemma 2 and 3 alternate sliding and full layers; Mistral slides everywhere) in the
batched engine, with a window far shorter than the prompts: the left-padded batch, chunked prefill and the
prefix cache must give exactly what `generate` gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.protocol import ChatJob, ChatMessage, SamplingParams
from devtools.families import FAMILIES, build_family_model
from workers.chat.engine import ChatEngine
from workers.chat.loader import load_causal_lm

PROMPTS = ["Once upon a time, in a small village by the sea, there lived an old fisherman and his daughter.",
           "Hello there, how are you today? I am fine, thank you."]
WINDOW = 8
MAX_TOKENS = 20


def _generate(folder: Path, prompt: str) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def _engine_outputs(engine: ChatEngine, prompts: list[str]) -> list[list[int]]:
    seqs = []
    for i, prompt in enumerate(prompts):
        job = ChatJob(request_id=f"r{i}", model="m", messages=[ChatMessage(role="user", content=prompt)],
                      params=SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), created=0.0)
        seq = engine.prepare(job)
        assert not hasattr(seq, "status"), seq
        engine.add(seq)
        seqs.append(seq)
    while engine.active:
        engine.step()
    return [seq.output_ids for seq in seqs]


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral"])
def test_sliding_window_engine_equals_generate(tmp_path: Path, family: str) -> None:
    base = FAMILIES[family]
    narrow = dataclasses.replace(base, config={**base.config, "sliding_window": WINDOW})
    folder = build_family_model(narrow, tmp_path / family)
    loaded = load_causal_lm(str(folder), "cpu", dtype_name="float32")
    assert loaded.model.config.sliding_window == WINDOW
    expected = [_generate(folder, p) for p in PROMPTS]
    engine = ChatEngine(loaded.model, loaded.tokenizer, loaded.device, 1024, prefill_chunk_tokens=16,
                        prefill_idle_tokens=16, prefix_cache_tokens=4096)  # chunks even with nothing decoding
    assert _engine_outputs(engine, PROMPTS[:1]) == expected[:1]  # alone, prefilled in chunks of 16
    assert _engine_outputs(engine, PROMPTS) == expected  # batched; the first prompt now from the prefix cache
    assert engine.prefix_cache.hits > 0
