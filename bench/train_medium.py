"""Train the medium benchmark Llama on local text, so quantization can be judged on a model that has learned something.

    .venv/bin/python bench/train_medium.py models/bench-medium-trained [--minutes 12]

The random medium model (`serve_bench.py --write-model medium`) is chaotic: its `initializer_range=0.5` makes greedy
argmax flip under any rounding (even bfloat16 against float32 agrees on ~12 % of tokens), so it cannot say whether
int8 preserves a model's output. No trained causal LM can be downloaded here, so this script trains one of the same
architecture (`serve_bench.MEDIUM`: 8 layers, hidden 512, vocabulary 32000) with plain torch on text that every
machine with this Python has: docstrings of the standard library (English prose about code, whitespace unwrapped).
On two shared cores a step of 8 x 48 tokens takes 4-10 s, so a 14-minute budget is ~100-200 steps: the defaults
trade breadth for depth so the model gets past unigram statistics in that time: a seeded sample of 500 docstrings
(each cut to 48 tokens, so seen several times) and a 2048-token byte-level BPE trained on them. The head keeps the
medium model's 32000 rows; only the tokenizer's rows take part in the loss, and the rest are set to the PAD token's
row at the end (PAD is never a target, so its logit is low), so greedy decoding never picks an undecodable id.

Half the samples are chat-formatted with the Llama-3 template the server applies (the user message is the start of
a docstring, the assistant continues it; loss only on the assistant part), so the model writes text after the
assistant header the way it writes text anywhere else. The samples never end with `<|eot_id|>`, so a 32-token
answer runs to its length. Training is budgeted by wall clock (`--minutes`) on top of a step cap, on the CPU threads
given; the log (losses, steps, seconds, sample answers) is written to `train_log.json` in the model folder.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `workers` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_bench import MEDIUM
from devtools.chat_models import BOS, EOT, PAD, SPECIAL_TOKENS, _train_tokenizer

SAMPLE_PROMPTS = ["Once upon a time, in a small village by the sea,", "Write a Python function that adds two integers.",
                  "Return the number of", "Hello there, how are you today?"]


def stdlib_docstrings(min_chars: int = 80) -> list[str]:
    """Module, class and function docstrings of the standard library, in a fixed order (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idle_test", "site-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    texts.append(" ".join(doc.split()))  # unwrapped: prose, not 72-column line breaks
    return texts


def build_samples(texts: list[str], tokenizer: Any, seq_len: int,
                  rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) pairs: half raw text after BOS, half a chat turn whose answer continues the user's text."""
    samples = []
    for text in texts:
        words = text.split(" ")
        if rng.random() < 0.5 or len(words) < 8:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"][:seq_len]
            samples.append((ids, list(ids)))
            continue
        cut = rng.randint(3, min(16, len(words) - 4))
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": " ".join(words[:cut])}],
                                               add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        answer = tokenizer(" ".join(words[cut:]), add_special_tokens=False)["input_ids"]
        ids = (prompt + answer)[:seq_len]
        samples.append((ids, ([-100] * len(prompt) + answer)[:seq_len]))
    return samples


def batches(samples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random):
    """Endless shuffled epochs of right-padded batches (padding is masked out of attention and loss)."""
    while True:
        order = list(range(len(samples)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [samples[i] for i in order[start:start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((batch_size, width), pad_id)
            labels = torch.full((batch_size, width), -100)
            mask = torch.zeros((batch_size, width), dtype=torch.long)
            for row, (x, y) in enumerate(chunk):
                ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
            yield ids, labels, mask


def greedy_samples(model: Any, tokenizer: Any, max_new_tokens: int = 32) -> list[dict[str, Any]]:
    out = []
    model.eval()
    with torch.inference_mode():
        for prompt in SAMPLE_PROMPTS:
            enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)[0, enc["input_ids"].shape[1]:]
            out.append({"prompt": prompt, "answer": tokenizer.decode(ids),
                        "distinct_ratio": len(set(ids.tolist())) / len(ids)})
    model.train()
    return out


def train(out_dir: Path, *, minutes: float, max_steps: int, batch_size: int, seq_len: int, lr: float,
          threads: int, seed: int, corpus_texts: int, tokenizer_vocab: int) -> dict[str, Any]:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    texts = stdlib_docstrings()
    rng.shuffle(texts)
    held_out_texts, texts = texts[:64], texts[64:64 + corpus_texts]
    tokenizer = _train_tokenizer(tokenizer_vocab, 4096, lines=texts)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=MEDIUM["vocab_size"], hidden_size=MEDIUM["hidden_size"],
        intermediate_size=MEDIUM["intermediate_size"], num_hidden_layers=MEDIUM["num_layers"],
        num_attention_heads=MEDIUM["num_heads"],
        num_key_value_heads=MEDIUM["num_kv_heads"], max_position_embeddings=4096, initializer_range=0.02,
        tie_word_embeddings=False, bos_token_id=ids[BOS], eos_token_id=ids[EOT], pad_token_id=ids[PAD], dtype="float32")
    model = LlamaForCausalLM(config).to(torch.float32).train()
    samples = build_samples(texts, tokenizer, seq_len, rng)
    held_out = build_samples(held_out_texts, tokenizer, seq_len, rng)
    trained_rows = len(tokenizer)
    def lm_loss(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        # Only the tokenizer's rows of the 32000-row head take part: the rest are never targets, and skipping them
        # saves a third of each step. bfloat16 autocast (this CPU has AVX512-BF16) roughly halves it again.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.model(input_ids=x, attention_mask=m).last_hidden_state
            logits = torch.nn.functional.linear(hidden[:, :-1], model.lm_head.weight[:trained_rows])
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, trained_rows), y[:, 1:].reshape(-1))

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 20

    def eval_loss() -> float:
        model.eval()
        losses = []
        with torch.inference_mode():
            loader = batches(held_out, 16, ids[PAD], random.Random(0))
            for _ in range(len(held_out) // 16):
                x, y, m = next(loader)
                losses.append(float(lm_loss(x, y, m)))
        model.train()
        return sum(losses) / len(losses)

    log: dict[str, Any] = {"corpus": "Python stdlib docstrings", "corpus_texts": len(texts),
                           "corpus_chars": sum(map(len, texts)), "tokenizer_vocab": len(tokenizer),
                           "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "threads": threads, "seed": seed,
                           "held_out_loss_initial": eval_loss(), "steps": []}
    print(f"corpus {log['corpus_texts']} docstrings, {log['corpus_chars']} chars; held-out loss "
          f"{log['held_out_loss_initial']:.3f} (ln {trained_rows} = {math.log(trained_rows):.3f})", flush=True)
    deadline = time.monotonic() + minutes * 60
    start = time.monotonic()
    loader = batches(samples, batch_size, ids[PAD], rng)
    step = 0
    while step < max_steps and time.monotonic() < deadline:
        for group in optimizer.param_groups:  # linear warmup, then cosine to 10 % over the budget (time or steps)
            progress = min(1.0, max(step / max_steps, (time.monotonic() - start) / (minutes * 60)))
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        x, y, m = next(loader)
        loss = lm_loss(x, y, m)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        log["steps"].append(round(loss.item(), 4))
        if step % 10 == 0 or step == 1:
            print(f"step {step} loss {loss.item():.3f} ({time.monotonic() - start:.0f} s)", flush=True)
    log.update(train_seconds=round(time.monotonic() - start, 1), train_steps=step,
               train_loss_first=log["steps"][0], train_loss_last10=sum(log["steps"][-10:]) / len(log["steps"][-10:]),
               held_out_loss_final=eval_loss())
    with torch.no_grad():  # rows past the tokenizer score like PAD, which training drove down (never a target)
        model.lm_head.weight[trained_rows:] = model.lm_head.weight[ids[PAD]]
    log["samples"] = greedy_samples(model, tokenizer)
    model.eval()
    gen = GenerationConfig(bos_token_id=ids[BOS], eos_token_id=ids[EOT], pad_token_id=ids[PAD], do_sample=False)
    model.generation_config = gen
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    gen.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--minutes", type=float, default=14.0, help="wall-clock budget for the training steps")
    parser.add_argument("--max-steps", type=int, default=600, help="step cap (also the length of the lr schedule)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-vocab", type=int, default=2048,
                        help="BPE tokens learned (the head keeps 32000 rows): few, so each is seen often")
    parser.add_argument("--corpus-texts", type=int, default=500,
                        help="docstrings trained on (a seeded sample): few enough to be seen more than once")
    args = parser.parse_args(argv)
    log = train(args.out_dir, minutes=args.minutes, max_steps=args.max_steps, batch_size=args.batch_size,
                seq_len=args.seq_len, lr=args.lr, threads=args.threads, seed=args.seed, corpus_texts=args.corpus_texts,
                tokenizer_vocab=args.tokenizer_vocab)
    print(json.dumps({k: v for k, v in log.items() if k != "steps"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
