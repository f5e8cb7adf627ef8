"""Tiny random models of every model family Axion serves, each with its real transformers config class, a locally
trained tokenizer, its family's chat template and its end-of-turn tokens as the released checkpoints ship them.

The hub is unreachable from tests, so the family test (tests/test_families_e2e.py) builds these instead. What makes
a family different for a server is kept real: the config class (and so the modeling code: Gemma's soft-capping and
sliding layers, Qwen3's q/k norms, Phi-3's fused projections, Granite's multipliers, GLM4's extra norms), the chat
template, and which tokens end a turn. Several families end a turn with a token that is not the tokenizer's
`eos_token` (Gemma's `<end_of_turn>`, Phi-3's `<|end|>`, GLM4's `<|user|>`): only `generation_config.json`'s
`eos_token_id` list names them, and a server that reads just the tokenizer runs on past the end of the turn.

`plant_stop` makes the random model actually emit the family's end-of-turn token a few tokens into a given prompt's
greedy answer, so a test sees generation stop there (or not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from devtools.chat_models import CHAT_TEMPLATE as LLAMA3_TEMPLATE
from devtools.chat_models import CORPUS

_ROLES_CHECK = ("{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
                "{{- raise_exception('Unsupported role: ' + message['role']) }}{%- endif %}")

QWEN3_TEMPLATE = (
    "{%- for message in messages %}" + _ROLES_CHECK +
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Gemma 2 refuses a system message and needs user/model alternation, as the released template does.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Gemma 3 folds a system message into the first user turn.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# Mistral v0.3: the system message goes before the last user message, inside its [INST] block.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}{%- endif %}{%- endfor %}"
)

GLM4_TEMPLATE = (
    "[gMASK]<sop>{%- for message in messages %}" + _ROLES_CHECK +
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

GRANITE_TEMPLATE = (
    "{%- for message in messages %}" + _ROLES_CHECK +
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)

# OLMo 1 (OLMo-7B-Instruct): role tags are plain text, the turn ends with the tokenizer's eos.
OLMO_TEMPLATE = (
    "{{ eos_token }}{% for message in messages %}" + _ROLES_CHECK +
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)

# OLMo 2 Instruct (the Tulu 3 template).
OLMO2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}" + _ROLES_CHECK +
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}" + _ROLES_CHECK +
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """One model family: its config class and the tokens and template of its released instruct checkpoints."""

    name: str
    config_class: str  # a transformers config class; AutoModelForCausalLM picks the model class from it
    template: str
    specials: list[str]  # special tokens, in the order the tokenizer trainer numbers them (ids 0..)
    eos: str  # the tokenizer's eos_token
    end_of_turn: str  # what the template closes the assistant's turn with
    stop: list[str]  # generation_config.json's eos_token_id, as the released checkpoint lists it
    bos: str | None = None
    pad: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # family-specific config values


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "LlamaConfig", LLAMA3_TEMPLATE,
           ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|finetune_right_pad_id|>"],
           eos="<|eot_id|>", end_of_turn="<|eot_id|>", stop=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
           bos="<|begin_of_text|>", pad="<|finetune_right_pad_id|>"),
    Family("qwen3", "Qwen3Config", QWEN3_TEMPLATE,
           ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
           eos="<|im_end|>", end_of_turn="<|im_end|>", stop=["<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>"),
    Family("gemma2", "Gemma2Config", GEMMA2_TEMPLATE,
           ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
           eos="<eos>", end_of_turn="<end_of_turn>", stop=["<eos>", "<end_of_turn>"], bos="<bos>", pad="<pad>",
           config={"query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                   "sliding_window": 4096}),
    Family("gemma3", "Gemma3TextConfig", GEMMA3_TEMPLATE,
           ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
           eos="<eos>", end_of_turn="<end_of_turn>", stop=["<eos>", "<end_of_turn>"], bos="<bos>", pad="<pad>",
           config={"query_pre_attn_scalar": 16, "sliding_window": 512,
                   "layer_types": ["sliding_attention", "full_attention"]}),
    Family("mistral", "MistralConfig", MISTRAL_TEMPLATE, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
           eos="</s>", end_of_turn="</s>", stop=["</s>"], bos="<s>", config={"sliding_window": None}),
    Family("glm4", "Glm4Config", GLM4_TEMPLATE,
           ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>"],
           eos="<|endoftext|>", end_of_turn="<|user|>", stop=["<|endoftext|>", "<|user|>", "<|observation|>"],
           pad="<|endoftext|>", config={"partial_rotary_factor": 0.5}),
    Family("granite", "GraniteConfig", GRANITE_TEMPLATE,
           ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"],
           eos="<|end_of_text|>", end_of_turn="<|end_of_text|>", stop=["<|end_of_text|>"], bos="<|end_of_text|>",
           pad="<|end_of_text|>",
           config={"embedding_multiplier": 12.0, "logits_scaling": 2.0, "residual_multiplier": 0.22,
                   "attention_multiplier": 0.0625}),
    Family("olmo", "OlmoConfig", OLMO_TEMPLATE, ["<|endoftext|>", "<|padding|>"],
           eos="<|endoftext|>", end_of_turn="<|endoftext|>", stop=["<|endoftext|>"], pad="<|padding|>",
           config={"clip_qkv": 8.0}),
    Family("olmo2", "Olmo2Config", OLMO2_TEMPLATE, ["<|endoftext|>", "<|pad|>"],
           eos="<|endoftext|>", end_of_turn="<|endoftext|>", stop=["<|endoftext|>"], bos="<|endoftext|>",
           pad="<|pad|>"),
    Family("phi3", "Phi3Config", PHI3_TEMPLATE,
           ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
           eos="<|endoftext|>", end_of_turn="<|end|>", stop=["<|endoftext|>", "<|assistant|>", "<|end|>"],
           bos="<s>", pad="<|endoftext|>"),
]}


def train_tokenizer(family: Family, vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the dev corpus, with the family's special tokens and template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=family.specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad, model_max_length=max_length,
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = family.template
    return fast


def build_family_model(family: Family | str, out_dir: str | Path, *, hidden_size: int = 64, num_layers: int = 2,
                       num_heads: int = 4, num_kv_heads: int = 2, head_dim: int | None = None,
                       intermediate_size: int = 128,
                       vocab_size: int = 400, max_position_embeddings: int = 2048, seed: int = 0,
                       stop_in_answer_to: list[dict[str, Any]] | None = None, stop_at_step: int = 3) -> Path:
    """Write a random-weight model of `family` with its tokenizer and generation config to `out_dir`.

    As in `chat_models.build_tiny_llama`: a wide initialisation keeps greedy argmax stable across batch shapes,
    and the output rows of special tokens are zeroed so the model never emits them (until `plant_stop`).
    Word embeddings are untied, so editing the output head never changes how a prompt is read.
    With `stop_in_answer_to`, the greedy answer to those messages ends its turn at `stop_at_step` or a little
    later (`plant_stop`).
    """
    fam = FAMILIES[family] if isinstance(family, str) else family
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(fam, vocab_size, max_position_embeddings)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in fam.specials}
    eos_id = ids[fam.eos]
    config = getattr(transformers, fam.config_class)(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads, max_position_embeddings=max_position_embeddings,
        initializer_range=0.5, tie_word_embeddings=False, eos_token_id=eos_id,
        bos_token_id=ids[fam.bos] if fam.bos else None, pad_token_id=ids[fam.pad] if fam.pad else None,
        dtype="float32", **fam.config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[list(ids.values())] = 0.0
        head[len(tokenizer):] = 0.0
    stop_ids = [ids[t] for t in fam.stop]
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=config.pad_token_id, do_sample=False)
    if stop_in_answer_to is not None:
        plant_stop(fam, model, tokenizer, stop_in_answer_to, stop_at_step)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def plant_stop(family: Family, model: Any, tokenizer: Any, messages: list[dict[str, Any]], at_step: int) -> int:
    """Make `model` end its turn (emit the family's end-of-turn token) at greedy step `at_step` of its answer to
    `messages`, or at the first later step whose token did not occur before it; return that step. The output row
    of the token chosen there moves to the end-of-turn token, so every earlier step, which never chose that
    token, is unchanged."""
    end_of_turn = int(tokenizer.convert_tokens_to_ids(family.end_of_turn))
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=at_step + 16, do_sample=False)
    answer = out[0, enc["input_ids"].shape[1]:].tolist()
    step = next(k for k in range(at_step, len(answer)) if answer[k] not in answer[:k])
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[end_of_turn] = head[answer[step]]
        head[answer[step]] = 0.0
    return step
