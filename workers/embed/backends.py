"""Embedding and rerank backends: fastembed (onnxruntime) or torch/transformers.

``load_embedding`` / ``load_reranker`` take a hub id or a local folder and pick the backend:

* a local folder holding an ONNX model (``model.onnx`` or ``onnx/model.onnx``) loads through fastembed.
  The folder is registered with fastembed's ``add_custom_model`` under a name derived from its path
  (pooling read from sentence-transformers' ``1_Pooling/config.json``, default mean; normalisation on) and
  opened with ``specific_model_path``, so nothing is downloaded. fastembed needs ``tokenizer.json`` and
  ``tokenizer_config.json`` (with ``model_max_length``) next to the ONNX file;
* a local folder without ONNX loads through torch/transformers (``AutoModel`` + pooling per the
  sentence-transformers config; ``AutoModelForSequenceClassification`` with one logit for rerankers);
* a hub id that fastembed lists in ``list_supported_models()`` loads through fastembed (downloaded into
  ``cache_dir`` / ``FASTEMBED_CACHE_PATH``); any other hub id goes through torch's ``from_pretrained``.

The fastembed path does not import torch. ``device="cuda"`` (or ``"cuda:N"``) means the CUDA execution
provider for fastembed, and load fails at once when onnxruntime does not offer it; for torch the model is
moved to that device.

``max_tokens`` is the tokenizer's ``model_max_length``, lowered to sentence-transformers'
``max_seq_length`` where a ``sentence_bert_config.json`` gives one, and capped at 512. Both backends
truncate at exactly ``max_tokens``; ``count_tokens`` counts without truncation (special tokens included).
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MAX_TOKENS_CAP = 512
# fastembed splits into batches of this size internally; the whole request goes in one call.
FASTEMBED_BATCH_SIZE = 256
# Rows per forward pass for the torch backend.
TORCH_BATCH_SIZE = 64
ONNX_CANDIDATES = ("model.onnx", "onnx/model.onnx")

Pooling = Literal["mean", "cls", "last_token"]


@runtime_checkable
class EmbeddingBackend(Protocol):
    model_id: str
    dim: int
    max_tokens: int
    backend: str  # "fastembed" | "torch"
    device: str  # as passed to load_*: "cpu", "cuda", "cuda:N"

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text has, special tokens included, before truncation."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Token ids back to text (ValueError for ids outside the vocabulary)."""
        ...

    def embed(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), dim]`` float32, L2-normalised; texts are truncated at ``max_tokens``."""
        ...


@runtime_checkable
class RerankBackend(Protocol):
    model_id: str
    max_tokens: int
    backend: str  # "fastembed" | "torch"
    device: str  # as passed to load_*: "cpu", "cuda", "cuda:N"

    def count_tokens(self, pairs: list[tuple[str, str]]) -> list[int]:
        """Tokens each (query, document) pair has as one cross-encoder input, before truncation."""
        ...

    def score(self, query: str, documents: list[str]) -> list[float]:
        """Raw relevance logits, one per document (the API applies the sigmoid)."""
        ...


# --------------------------------------------------------------------------------------------------
# helpers


def _read_json(path: Path) -> dict[str, Any] | list[Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def find_onnx(folder: Path) -> str | None:
    """The ONNX file of a local model folder, relative to it, or None."""
    for rel in ONNX_CANDIDATES:
        if (folder / rel).is_file():
            return rel
    return None


def _local_dir(name: str) -> Path | None:
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ValueError(f"{name!r} is not a model folder")
    return None


def _fetch_file(name: str, local: Path | None, rel: str, cache_dir: str | None) -> Path | None:
    """A config file of a local folder, or of a hub repo (best effort, None when missing/unreachable)."""
    if local is not None:
        path = local / rel
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name, rel, cache_dir=cache_dir))
    except Exception:
        return None


def _pooling_config(name: str, local: Path | None, cache_dir: str | None) -> dict[str, Any] | None:
    modules = _fetch_file(name, local, "modules.json", cache_dir)
    pooling_dir = "1_Pooling"
    if modules is not None:
        for module in _read_json(modules) or []:
            if isinstance(module, dict) and str(module.get("type", "")).endswith("models.Pooling"):
                pooling_dir = module.get("path") or pooling_dir
    cfg = _fetch_file(name, local, f"{pooling_dir}/config.json", cache_dir)
    data = _read_json(cfg) if cfg is not None else None
    return data if isinstance(data, dict) else None


def _pooling_mode(name: str, local: Path | None, cache_dir: str | None) -> Pooling:
    """Pooling from sentence-transformers' Pooling config; mean when there is none."""
    cfg = _pooling_config(name, local, cache_dir)
    if not cfg:
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_lasttoken"):
        return "last_token"
    enabled = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
    if enabled:
        raise ValueError(f"{name}: unsupported sentence-transformers pooling {enabled}")
    return "mean"


def _valid_length(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= sys.maxsize:
        return None
    return value


def _st_max_seq_length(name: str, local: Path | None, cache_dir: str | None) -> int | None:
    cfg = _fetch_file(name, local, "sentence_bert_config.json", cache_dir)
    data = _read_json(cfg) if cfg is not None else None
    return _valid_length(data.get("max_seq_length")) if isinstance(data, dict) else None


def _cap(*limits: int | None) -> int:
    return min([MAX_TOKENS_CAP, *[x for x in limits if x is not None]])


def _counting_tokenizer(tok: Tokenizer) -> Tokenizer:
    """A copy of a ``tokenizers.Tokenizer`` with truncation and padding off, for counting."""
    from tokenizers import Tokenizer

    clone = Tokenizer.from_str(tok.to_str())
    clone.no_truncation()
    clone.no_padding()
    return clone


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _onnx_providers(device: str) -> list[Any]:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                f"device={device!r} needs onnxruntime's CUDAExecutionProvider, but this onnxruntime only "
                f"offers {available}. Install fastembed-gpu (and uninstall fastembed/onnxruntime: the two "
                "must not be installed together)."
            )
        if ":" in device:
            return [("CUDAExecutionProvider", {"device_id": int(device.split(":", 1)[1])})]
        return ["CUDAExecutionProvider"]
    raise ValueError(f"unsupported device {device!r} for the fastembed backend (use 'cpu' or 'cuda[:N]')")


def _is_listed(name: str, supported: list[dict[str, Any]]) -> bool:
    return any(str(m.get("model", "")).lower() == name.lower() for m in supported)


_register_lock = threading.Lock()


def _registered_name(kind: str, folder: Path, model_file: str, pooling: str = "") -> str:
    """A fastembed model name unique to this folder (and its registration parameters)."""
    digest = hashlib.sha1(f"{folder}|{model_file}|{pooling}".encode()).hexdigest()[:12]
    return f"axion-local/{kind}-{folder.name}-{digest}"


def _hidden_size(folder: Path) -> int | None:
    config = _read_json(folder / "config.json")
    if isinstance(config, dict):
        for key in ("hidden_size", "d_model", "dim", "n_embd"):
            if _valid_length(config.get(key)):
                return int(config[key])
    pooling = _read_json(folder / "1_Pooling" / "config.json")
    if isinstance(pooling, dict) and _valid_length(pooling.get("word_embedding_dimension")):
        return int(pooling["word_embedding_dimension"])
    return None


def _limit_fastembed_truncation(tok: Tokenizer | None, max_tokens: int) -> None:
    """Make fastembed's own tokenizer truncate at ``max_tokens`` (it reads only tokenizer_config.json)."""
    if tok is None:
        return
    truncation = tok.truncation or {}
    if truncation.get("max_length") != max_tokens:
        tok.enable_truncation(max_length=max_tokens, direction=truncation.get("direction", "right"))


# --------------------------------------------------------------------------------------------------
# fastembed


class FastEmbedEmbedding:
    backend = "fastembed"

    def __init__(self, name: str, *, local: Path | None, device: str, cache_dir: str | None) -> None:
        from fastembed import TextEmbedding

        providers = _onnx_providers(device)
        self.model_id = name
        self.device = device
        kwargs: dict[str, Any] = {}
        dim: int | None = None
        if local is not None:
            from fastembed.common.model_description import ModelSource, PoolingType

            model_file = find_onnx(local)
            assert model_file is not None
            pooling = _pooling_mode(name, local, None)
            fe_name = _registered_name("embed", local, model_file, pooling)
            dim = _hidden_size(local)
            with _register_lock:
                if not _is_listed(fe_name, TextEmbedding.list_supported_models()):
                    TextEmbedding.add_custom_model(
                        model=fe_name,
                        pooling=PoolingType[pooling.upper()],
                        normalization=True,
                        sources=ModelSource(hf=fe_name),
                        dim=dim or 0,
                        model_file=model_file,
                        description=f"local folder {local}",
                    )
            kwargs["specific_model_path"] = str(local)
        else:
            fe_name = name
        self._model = TextEmbedding(model_name=fe_name, cache_dir=cache_dir, providers=providers, **kwargs)
        inner = self._model.model
        tok = getattr(inner, "tokenizer", None)
        fe_limit = _valid_length(((tok.truncation if tok is not None else None) or {}).get("max_length"))
        st_limit = _st_max_seq_length(name, local, None) if local is not None else None
        self.max_tokens = _cap(fe_limit, st_limit)
        _limit_fastembed_truncation(tok, self.max_tokens)
        self._count_tok = _counting_tokenizer(tok) if tok is not None else None
        if local is None:
            dim = self._model.embedding_size
        self.dim = int(dim) if dim else int(self.embed(["dimension probe"]).shape[1])

    def count_tokens(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        assert self._count_tok is not None
        return [len(enc.ids) for enc in self._count_tok.encode_batch(list(texts))]

    def decode(self, ids: list[int]) -> str:
        """Token ids (OpenAI's token-array input) back to text, by this model's own tokenizer."""
        if self._count_tok is None:
            raise ValueError("this model's tokenizer is not available to decode token ids")
        if any(not 0 <= i < self._count_tok.get_vocab_size() for i in ids):
            raise ValueError("token id outside the vocabulary")
        return str(self._count_tok.decode(ids, skip_special_tokens=True))

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        rows = list(self._model.embed(list(texts), batch_size=FASTEMBED_BATCH_SIZE))
        return _l2_normalise(np.stack(rows))


class FastEmbedReranker:
    backend = "fastembed"

    def __init__(self, name: str, *, local: Path | None, device: str, cache_dir: str | None) -> None:
        from fastembed.rerank.cross_encoder import TextCrossEncoder

        providers = _onnx_providers(device)
        self.model_id = name
        self.device = device
        kwargs: dict[str, Any] = {}
        if local is not None:
            from fastembed.common.model_description import ModelSource

            model_file = find_onnx(local)
            assert model_file is not None
            fe_name = _registered_name("rerank", local, model_file)
            with _register_lock:
                if not _is_listed(fe_name, TextCrossEncoder.list_supported_models()):
                    TextCrossEncoder.add_custom_model(
                        model=fe_name,
                        sources=ModelSource(hf=fe_name),
                        model_file=model_file,
                        description=f"local folder {local}",
                    )
            kwargs["specific_model_path"] = str(local)
        else:
            fe_name = name
        self._model = TextCrossEncoder(model_name=fe_name, cache_dir=cache_dir, providers=providers, **kwargs)
        tok = getattr(self._model.model, "tokenizer", None)
        fe_limit = _valid_length(((tok.truncation if tok is not None else None) or {}).get("max_length"))
        self.max_tokens = _cap(fe_limit)
        _limit_fastembed_truncation(tok, self.max_tokens)
        self._count_tok = _counting_tokenizer(tok) if tok is not None else None

    def count_tokens(self, pairs: list[tuple[str, str]]) -> list[int]:
        if not pairs:
            return []
        assert self._count_tok is not None
        return [len(enc.ids) for enc in self._count_tok.encode_batch([tuple(p) for p in pairs])]

    def score(self, query: str, documents: list[str]) -> list[float]:
        if not documents:
            return []
        return [float(s) for s in self._model.rerank(query, list(documents), batch_size=FASTEMBED_BATCH_SIZE)]


# --------------------------------------------------------------------------------------------------
# torch / transformers


def _torch_device(device: str) -> Any:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but torch sees no CUDA device (torch {torch.__version__})")
    return torch.device(device)


def _hf_counting_tokenizer(hf_tok: Any) -> Tokenizer | None:
    backend = getattr(hf_tok, "backend_tokenizer", None)
    return _counting_tokenizer(backend) if backend is not None else None


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
        self._pooling = _pooling_mode(name, local, cache_dir)
        self.max_tokens = _cap(_valid_length(self._tok.model_max_length), _st_max_seq_length(name, local, cache_dir))
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
        self.max_tokens = _cap(_valid_length(self._tok.model_max_length))
        self._count_tok = _hf_counting_tokenizer(self._tok)

    def count_tokens(self, pairs: list[tuple[str, str]]) -> list[int]:
        return _hf_count(self._tok, self._count_tok, [tuple(p) for p in pairs]) if pairs else []

    def score(self, query: str, documents: list[str]) -> list[float]:
        torch = self._torch
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(documents), TORCH_BATCH_SIZE):
                docs = list(documents[start : start + TORCH_BATCH_SIZE])
                batch = self._tok(
                    [query] * len(docs),
                    docs,
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                ).to(self._device)
                logits = self._model(**batch).logits.float()[:, 0]
                scores.extend(float(x) for x in logits.cpu())
        return scores


# --------------------------------------------------------------------------------------------------
# entry points


def load_embedding(name: str, *, device: str = "cpu", cache_dir: str | None = None) -> EmbeddingBackend:
    """Load an embedding model from a hub id or a local folder (see the module docstring for the rules)."""
    local = _local_dir(name)
    if local is not None:
        cls = FastEmbedEmbedding if find_onnx(local) else TorchEmbedding
        return cls(name, local=local, device=device, cache_dir=cache_dir)
    from fastembed import TextEmbedding

    if _is_listed(name, TextEmbedding.list_supported_models()):
        return FastEmbedEmbedding(name, local=None, device=device, cache_dir=cache_dir)
    return TorchEmbedding(name, local=None, device=device, cache_dir=cache_dir)


def load_reranker(name: str, *, device: str = "cpu", cache_dir: str | None = None) -> RerankBackend:
    """Load a cross-encoder from a hub id or a local folder (see the module docstring for the rules)."""
    local = _local_dir(name)
    if local is not None:
        cls = FastEmbedReranker if find_onnx(local) else TorchReranker
        return cls(name, local=local, device=device, cache_dir=cache_dir)
    from fastembed.rerank.cross_encoder import TextCrossEncoder

    if _is_listed(name, TextCrossEncoder.list_supported_models()):
        return FastEmbedReranker(name, local=None, device=device, cache_dir=cache_dir)
    return TorchReranker(name, local=None, device=device, cache_dir=cache_dir)
