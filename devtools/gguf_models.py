"""Write a local Qwen3 model folder (e.g. one from `devtools.families`) as a self-contained GGUF file with the `gguf`
package (llama.cpp's own writer): weights, config, tokenizer and chat template, as llama.cpp's converter lays them
out, so a test can check that a GGUF model loads and serves without any hub download.

Matrices are written as Q8_0 (blocks of 32 int8 values with one f16 scale, llama.cpp's 8-bit format) or F16/F32;
norms stay F32, as llama.cpp keeps them. The token list is padded to the model's vocabulary size with unused
`[PADn]` tokens, as llama.cpp's converter does, since transformers sizes the vocabulary from the token list.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

QUANT_TYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
               "Q8_0": gguf.GGMLQuantizationType.Q8_0}


def write_qwen3_gguf(model_dir: str | Path, out_file: str | Path, quant: str = "Q8_0") -> Path:
    """Convert the Qwen3 model in `model_dir` to `out_file`; return its path."""
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "qwen3":
        raise ValueError(f"{model_dir} holds a {config.model_type} model; this writer handles qwen3 only")
    if config.head_dim != 128:
        raise ValueError("transformers 5.24 reads no head_dim from a qwen3 GGUF and assumes Qwen3's 128")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = Path(out_file)
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3])
    writer.add_name(Path(model_dir).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "Q8_0" else
                         gguf.LlamaFileType.MOSTLY_F16 if quant == "F16" else gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        base, _, suffix = name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {name}")
        data = tensor.numpy()
        qtype = QUANT_TYPES[quant] if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.F16:
            data = data.astype(np.float16)
        elif qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, qtype)
        writer.add_tensor(f"{gguf_name}.{suffix}", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: object, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp stores GPT-2 style ones: tokens by id, their types, the merges."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())  # type: ignore[attr-defined]
    vocab: dict[str, int] = spec["model"]["vocab"]
    special = {t["content"]: t["id"] for t in spec["added_tokens"]}
    vocab.update(special)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if by_id[i] in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_token_id)  # type: ignore[attr-defined]
    if tokenizer.pad_token_id is not None:  # type: ignore[attr-defined]
        writer.add_pad_token_id(tokenizer.pad_token_id)  # type: ignore[attr-defined]
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)  # type: ignore[attr-defined]
