"""The torch/transformers backends, for models fastembed does not know: ``AutoModel`` with the pooling of the
sentence-transformers config, ``AutoModelForSequenceClassification`` with one logit for rerankers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.embed.model_files import cap_tokens, counting_tokenizer, pooling_mode, st_max_seq_length, valid_length

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Rows per forward pass.
TORCH_BATCH_SIZE = 64


def _torch_device(device: str) -> Any:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but torch sees no CUDA device (torch {torch.__version__})")
    return torch.device(device)


def _hf_counting_tokenizer(hf_tok: Any) -> Tokenizer | None:
    backend = getattr(hf_tok, "backend_tokenizer", None)
    return counting_tokenizer(backend) if backend is not None else None


def _hf_count(hf_tok: Any, count_tok: Tokenizer | None, inputs: Sequence[Any]) -> list[int]:
    if count_tok is not None:
        return [len(enc.ids) for enc in count_tok.encode_batch(list(inputs))]
    out = []
    for item in inputs:  # slow tokenizer fallback
        a, b = (item, None) if isinstance(item, str) else item
        out.append(len(hf_tok(a, b, add_special_tokens=True, truncation=False)["input_ids"]))
    return out


class _TorchModel:
    """What both torch backends load: the tokenizer and a model of `model_class`, on the asked device."""

    backend = "torch"

    def _load(self, name: str, local: Path | None, device: str, cache_dir: str | None, model_class: str) -> Any:
        import torch
        import transformers

        self._torch = torch
        self._device = _torch_device(device)
        self.model_id = name
        self.device = device
        src = str(local) if local is not None else name
        self._tok = transformers.AutoTokenizer.from_pretrained(src, cache_dir=cache_dir)
        return getattr(transformers, model_class).from_pretrained(src, cache_dir=cache_dir)


class TorchEmbedding(_TorchModel):
    def __init__(self, name: str, *, local: Path | None, device: str, cache_dir: str | None) -> None:
        self._model = self._load(name, local, device, cache_dir, "AutoModel").to(self._device).eval()
        self._pooling = pooling_mode(name, local, cache_dir)
        self.max_tokens = cap_tokens(valid_length(self._tok.model_max_length),
                                     st_max_seq_length(name, local, cache_dir))
        self._count_tok = _hf_counting_tokenizer(self._tok)
        self.dim = int(self._model.config.hidden_size)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return _hf_count(self._tok, self._count_tok, texts) if texts else []

    def decode(self, ids: list[int]) -> str:
        """Token ids (OpenAI's token-array input) back to text, by this model's own tokenizer."""
        if any(not 0 <= i < len(self._tok) for i in ids):
            raise ValueError("token id outside the vocabulary")
        return str(self._tok.decode(ids, skip_special_tokens=True))

    def embed(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), TORCH_BATCH_SIZE):
                batch = self._tok(
                    list(texts[start : start + TORCH_BATCH_SIZE]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                ).to(self._device)
                hidden = self._model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"]
                if self._pooling == "cls":
                    pooled = hidden[:, 0]
                elif self._pooling == "last_token":
                    last = mask.sum(dim=1) - 1  # right padding
                    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
                else:
                    m = mask.unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[start : start + len(pooled)] = pooled.cpu().numpy()
        return out


class TorchReranker(_TorchModel):
    def __init__(self, name: str, *, local: Path | None, device: str, cache_dir: str | None) -> None:
        model = self._load(name, local, device, cache_dir, "AutoModelForSequenceClassification")
        if model.config.num_labels != 1:
            raise ValueError(f"{name}: a reranker must have one output logit, this one has {model.config.num_labels}")
        self._model = model.to(self._device).eval()
        self.max_tokens = cap_tokens(valid_length(self._tok.model_max_length))
        self._count_tok = _hf_counting_tokenizer(self._tok)

    def count_tokens(self, pairs: list[tuple[str, str]]) -> list[int]:
        return _hf_count(self._tok, self._count_tok, [tuple(p) for p in pairs]) if pairs else []

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        torch = self._torch
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(pairs), TORCH_BATCH_SIZE):
                chunk = pairs[start : start + TORCH_BATCH_SIZE]
                batch = self._tok([q for q, _ in chunk], [d for _, d in chunk], padding=True, truncation=True,
                                  max_length=self.max_tokens, return_tensors="pt").to(self._device)
                logits = self._model(**batch).logits.float()[:, 0]
                scores.extend(float(x) for x in logits.cpu())
        return scores
