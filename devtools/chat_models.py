"""Build tiny, deterministic Llama-architecture models for offline development and tests.

The hub is not reachable from CI or dev boxes, so tests that need a "real" causal LM
(tokenizer, chat template, generation config, safetensors weights) build one locally
with :func:`build_tiny_llama`. The weights are random but seeded, so every build with
the same arguments produces byte-identical weights and identical greedy outputs.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
PAD = "<|pad|>"
# Order matters: the BPE trainer assigns ids 0..4 in this order.
SPECIAL_TOKENS: list[str] = [BOS, EOT, START_HEADER, END_HEADER, PAD]

# Llama-3 style template. Content may be a string or a list of {"type": "text"} parts,
# so OpenAI-style multi-part messages render too.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    # Tools, Hermes/Qwen style: signatures in a system block, calls as <tool_call>{json}</tool_call>.
    "{%- if tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nYou may call these functions:\\n<tools>\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson + '\\n' }}{%- endfor %}"
    "{{- '</tools>\\nCall one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'developer', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('Unsupported role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- elif message['content'] is none %}{%- set content = '' %}"
    "{%- else %}{%- set content = namespace(text='') %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'text' %}"
    "{%- set content.text = content.text + part['text'] %}{%- endif %}{%- endfor %}"
    "{%- set content = content.text %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}"
    "{{- '<|start_header_id|>tool<|end_header_id|>\\n\\n<tool_response>\\n' + content | trim }}"
    "{{- '\\n</tool_response><|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + content | trim }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{- '<tool_call>' + {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{- '</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Small, varied English corpus: enough for BPE to learn common merges (words, digits,
# punctuation, whitespace runs) so prompts encode to a reasonable number of tokens.
CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
Hello there, how are you today? I am fine, thank you. You are a helpful assistant.
Once upon a time, in a small village by the sea, there lived an old fisherman and his
daughter. Every morning they rowed out past the lighthouse, cast their nets, and sang
songs about the weather, the tides, and the stars that guided sailors home at night.
Machine learning models turn text into tokens, tokens into numbers, and numbers back
into text. A server receives requests, schedules batches, and streams responses to
clients over HTTP; latency and throughput are measured in milliseconds and tokens/s.
Q: What is 12 + 30? A: 42. Q: What is 7 * 8? A: 56. The year 2024 had 366 days.
Prices: $3.50, $19.99, and 100% off (limited time!). Call 555-0123 or email info@example.com.
"Quotes", 'apostrophes', [brackets], {braces}, <angles>, #hash, @at, ^caret, ~tilde, |pipe|.
def add(a: int, b: int) -> int:
    return a + b  # simple Python function
Weather report: sunny in the morning, cloudy by noon, light rain in the evening.
She said: "Don't worry; we'll finish the project on time." He replied, "I hope so."
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 50 99 100 1000 65536.
The committee met on Tuesday, March 5th, to discuss the budget, the schedule & the plan.
"""


def _train_tokenizer(
    vocab_size: int, max_length: int, lines: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``lines`` (default: :data:`CORPUS`).

    Byte-level pre-tokenization plus the byte-level decoder make any text encodable and
    make ``decode(encode(text))`` roundtrip exactly. On a tiny corpus the trainer stops
    once no merges are left, so the result may be smaller than ``vocab_size``.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if lines is None:
        lines = CORPUS.splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer)
    # Like Llama 3: plain encode() prepends BOS; the chat template adds its own BOS and
    # apply_chat_template encodes without special tokens, so there is no double BOS.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,  # head_dim 32: the smallest vLLM's CPU attention takes
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
) -> Path:
    """Write a random-weight Llama causal LM, its tokenizer and generation config to ``out_dir``.

    Two tweaks make greedy decoding useful for tests despite random weights:

    * ``initializer_range=0.5`` (default 0.02) spreads the logits out, so the gap between
      the top-1 and top-2 logits is large compared with float noise and argmax does not
      flip between batch sizes, kernels or devices (measured: min gap ~5e-3 over 5 chat
      prompts x 30 greedy steps, versus ~1e-3 at 0.2).
    * The ``lm_head`` rows of every special token and of every padding id past the
      trained vocabulary are zeroed. Their logit is then exactly 0 while the maximum of
      the other (roughly zero-mean, wide) logits is well above 0, so greedy decoding
      practically never emits EOS early (``max_new_tokens`` is honoured) and never emits
      ids the tokenizer cannot decode. Input embeddings are untied and left untouched.

    ``config.vocab_size`` is the requested ``vocab_size``; a tiny corpus may yield fewer
    BPE tokens, in which case the embedding is simply larger than ``len(tokenizer)``.
    ``tie_word_embeddings`` shares the input embedding with ``lm_head`` (as Llama 3.2 1B does),
    so the zeroed rows are zero there too; ``dtype`` is the dtype the weights are saved in.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size must be >= {min_vocab} (byte alphabet + special tokens)"
        )

    tokenizer = _train_tokenizer(vocab_size, max_position_embeddings)
    ids = {t: cast(int, tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}  # one token, one id
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=0.5,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOT],
        pad_token_id=ids[PAD],
        dtype=dtype,
    )

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()  # type: ignore[arg-type]  # @wraps hides `self`
    with torch.no_grad():
        head = model.lm_head.weight
        head[list(ids.values())] = 0.0
        head[len(tokenizer) :] = 0.0
    model = model.to(getattr(torch, dtype))

    gen = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOT],
        pad_token_id=ids[PAD],
        do_sample=False,
    )
    model.generation_config = gen
    model.save_pretrained(out, safe_serialization=True)
    gen.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``DIR [--hidden-size N ...]``; prints the folder written."""
    parser = argparse.ArgumentParser(prog="axion dev tiny-model",
                                     description="Build a tiny random Llama model for dev/tests.")
    parser.add_argument("dir", metavar="DIR", type=Path, help="output folder")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_llama(
        args.dir,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        seed=args.seed,
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
