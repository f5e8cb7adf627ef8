"""Every model family through the whole server: `axion api`, real Redis, and a real chat worker per family
(tests/worker_host.py), driven with the openai SDK; greedy output must equal `model.generate` on the family's
own chat template, and generation must stop on the family's end-of-turn token even where that token is not the
tokenizer's eos (Gemma's `<end_of_turn>`, Phi-3's `<|end|>`, GLM4's `<|user|>`: generation_config.json's list).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from common.redis_server import EmbeddedRedis, free_port
from devtools.families import FAMILIES
from tests.conftest import REPO, Proc, Server, axion_env, get_json, wait_ready

PLANTED = [{"role": "user", "content": "Hello there, how are you today?"}]  # answered with a few tokens, then a stop
OTHER = [{"role": "system", "content": "You are a terse assistant."},
         {"role": "user", "content": "Write one line about the sea."}]
NO_SYSTEM = {"gemma2"}  # its template refuses system messages, as the released one does
MAX_TOKENS = 12
INT8_MODEL = "llama-int8"
EVERY_4 = "llama-every-4"  # the llama folder again, with STREAM_INTERVAL=4


@pytest.fixture(scope="module")
def family_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from devtools.families import build_family_model

    root = tmp_path_factory.mktemp("families")
    port = free_port()
    with EmbeddedRedis() as redis:
        env = axion_env(root / "llama", redis.url, port, MAX_SEQ_LEN="512", MAX_BATCH_SIZE="4",
                        CACHE_CAPACITY="0")
        api = Proc(["api"], env, root / "api.log").start()  # starts while the models are built
        specs = [str(build_family_model(name, root / name, stop_in_answer_to=PLANTED)) for name in FAMILIES]
        specs += [json.dumps({"MODEL_NAME": str(root / "llama"), "SERVED_MODEL_NAME": INT8_MODEL,
                              "QUANTIZATION": "int8"}),
                  json.dumps({"MODEL_NAME": str(root / "llama"), "SERVED_MODEL_NAME": EVERY_4, "STREAM_INTERVAL": "4"}),
                  str(_qwen3_gguf(root))]
        host = WorkerHost(specs, env, root / "workers.log").start()
        procs = [api, host]
        try:
            wait_ready(f"http://127.0.0.1:{port}", procs, workers=len(specs))
            yield Server(f"http://127.0.0.1:{port}", str(root), procs, redis.url)
        finally:
            host.stop(signal.SIGKILL)
            assert api.stop() == 0, api.log()[-3000:]


def _qwen3_gguf(root: Path) -> Path:
    """A tiny Qwen3 (head_dim 128, as every Qwen3 has) as a Q8_0 GGUF file alone in its folder: config, weights,
    tokenizer and chat template all come from the file."""
    from devtools.families import build_family_model
    from devtools.gguf_models import write_qwen3_gguf

    source = build_family_model("qwen3", root / "qwen3-128", head_dim=128)
    (root / "gguf").mkdir()
    return write_qwen3_gguf(source, root / "gguf" / "qwen3-tiny-q8_0.gguf", "Q8_0")


class WorkerHost(Proc):
    """`python -m tests.worker_host FOLDER...`: one real chat worker per folder, in one process."""

    def start(self) -> WorkerHost:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "tests.worker_host", *self.args], env=self.env,
                                        stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        return self


@cache
def _reference_model(folder: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def reference(folder: str, messages: list[dict], max_tokens: int) -> tuple[str, int, str]:
    """Greedy `model.generate` on the chat template: (text, completion tokens, finish reason)."""
    import torch

    model, tokenizer = _reference_model(folder)
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    stops = model.generation_config.eos_token_id
    stopped = new[-1] in (stops if isinstance(stops, list) else [stops])
    return tokenizer.decode(new, skip_special_tokens=True), len(new), "stop" if stopped else "length"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_greedy_equals_generate(family_server: Server, family: str) -> None:
    folder = str(Path(family_server.model) / family)
    client = family_server.client(timeout=60)

    # The planted answer ends its turn a few tokens in, with the family's end-of-turn token.
    text, tokens, finish = reference(folder, PLANTED, MAX_TOKENS)
    assert finish == "stop" and tokens < MAX_TOKENS, "the model did not end its turn where plant_stop put the stop"
    resp = client.chat.completions.create(model=folder, messages=PLANTED, temperature=0, max_tokens=MAX_TOKENS)
    assert resp.choices[0].message.content == text
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == tokens

    # Another prompt, streamed, runs to max_tokens.
    messages = OTHER[1:] if family in NO_SYSTEM else OTHER
    text, tokens, finish = reference(folder, messages, MAX_TOKENS)
    streamed, finishes, usage = "", [], None
    for chunk in client.chat.completions.create(model=folder, messages=messages, temperature=0, stream=True,
                                                max_tokens=MAX_TOKENS, stream_options={"include_usage": True}):
        if chunk.choices:
            streamed += chunk.choices[0].delta.content or ""
            finishes += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
        usage = chunk.usage or usage
    assert streamed == text
    assert finishes == [finish]
    assert usage is not None and usage.completion_tokens == tokens


def test_gemma2_template_refusal_is_a_400(family_server: Server) -> None:
    """The family's own template rules reach the client: Gemma 2 refuses a system message."""
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        family_server.client().chat.completions.create(model=str(Path(family_server.model) / "gemma2"),
                                                       messages=OTHER, max_tokens=4)
    assert "System role not supported" in str(info.value)


def _greedy(model, tokenizer, messages: list[dict], max_tokens: int) -> tuple[str, int]:
    import torch

    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def test_gguf_qwen3_serves(family_server: Server) -> None:
    """MODEL_NAME is a .gguf file: the server's answer equals transformers' own GGUF load + generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(family_server.model) / "gguf" / "qwen3-tiny-q8_0.gguf"
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert model.config.model_type == "qwen3"
    text, tokens = _greedy(model, tokenizer, OTHER, MAX_TOKENS)
    resp = family_server.client(timeout=60).chat.completions.create(model=str(path), messages=OTHER, temperature=0,
                                                                    max_tokens=MAX_TOKENS)
    assert resp.choices[0].message.content == text and text
    assert resp.usage is not None and resp.usage.completion_tokens == tokens


def test_int8_weights_serve(family_server: Server) -> None:
    """QUANTIZATION=int8: the answer equals generate on the same model quantized with torchao directly, and the
    worker reports (in /health) the weights as stored, well under the float32 copy's."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(family_server.model) / "llama"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    quantize_(model, Int8WeightOnlyConfig())
    text, tokens = _greedy(model, AutoTokenizer.from_pretrained(folder), OTHER, MAX_TOKENS)
    resp = family_server.client(timeout=60).chat.completions.create(model=INT8_MODEL, messages=OTHER, temperature=0,
                                                                    max_tokens=MAX_TOKENS)
    assert resp.choices[0].message.content == text
    assert resp.usage is not None and resp.usage.completion_tokens == tokens

    workers = {w["model"]: w for w in get_json(f"{family_server.base_url}/health")["workers"]}
    memory = {model: w["memory"]["weights_bytes"] for model, w in workers.items()}
    # Other weights, other answers: the response cache must not hand the float32 model's answers out as int8's.
    assert workers[INT8_MODEL]["revision"] == workers[str(folder)]["revision"] + "+int8"
    ratio = memory[INT8_MODEL] / memory[str(folder)]
    print(f"weights in /health: float32 {memory[str(folder)]} B, int8 {memory[INT8_MODEL]} B, ratio {ratio:.3f}")
    assert ratio <= 0.55


def test_stream_interval_sends_tokens_in_pieces(family_server: Server) -> None:
    """STREAM_INTERVAL=4: the same greedy text and one logprob per token, in fewer chunks than tokens (the first
    token alone, then pieces of up to four); the same model at the default interval sends a chunk per token."""
    folder = str(Path(family_server.model) / "llama")
    text, tokens, _finish = reference(folder, OTHER, MAX_TOKENS)
    client = family_server.client(timeout=60)
    chunks = {}
    for model in (folder, EVERY_4):
        pieces = [(c.choices[0].delta.content or "", [t.token for t in c.choices[0].logprobs.content or []])
                  for c in client.chat.completions.create(model=model, messages=OTHER, temperature=0, stream=True,
                                                          max_tokens=MAX_TOKENS, logprobs=True)
                  if c.choices and c.choices[0].logprobs is not None]
        assert "".join(t for t, _ in pieces) == text, model
        assert sum(len(lp) for _, lp in pieces) == tokens, model
        chunks[model] = [len(lp) for _, lp in pieces]
    assert chunks[folder] == [1] * tokens
    # The first token alone; then pieces of four; what is held at the end goes with (just before) the finish.
    assert chunks[EVERY_4][0] == 1 and max(chunks[EVERY_4]) == 4 and len(chunks[EVERY_4]) <= 2 + (tokens - 1) // 4 + 1
