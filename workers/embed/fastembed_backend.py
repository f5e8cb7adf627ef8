"""The fastembed (ONNX Runtime) backends. A local folder is registered with ``add_custom_model`` under a name
derived from its path and opened with ``specific_model_path``, so nothing is downloaded."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.embed.model_files import (
    cap_tokens,
    counting_tokenizer,
    find_onnx,
    l2_normalise,
    pooling_mode,
    read_json,
    st_max_seq_length,
    valid_length,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# fastembed splits into batches of this size internally; the whole request goes in one call.
FASTEMBED_BATCH_SIZE = 256


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


def _stop_spinning(holder: Any) -> None:
    """Rebuild fastembed's ONNX Runtime session with its intra-op threads sleeping between calls.

    By default they spin after every run, which burns a core while a worker waits for the next batch: in the
    server, that is the core the API and the clients need. fastembed exposes no option for it."""
    import onnxruntime as ort

    session = holder.model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    holder.model = ort.InferenceSession(session._model_path, providers=session.get_providers(),
                                        sess_options=options)


def fastembed_models(kind: str) -> list[dict[str, Any]]:
    """The models fastembed can download for `kind` ("embed" or "rerank")."""
    if kind == "embed":
        from fastembed import TextEmbedding

        return TextEmbedding.list_supported_models()
    from fastembed.rerank.cross_encoder import TextCrossEncoder

    return TextCrossEncoder.list_supported_models()


def is_listed(name: str, supported: list[dict[str, Any]]) -> bool:
    return any(str(m.get("model", "")).lower() == name.lower() for m in supported)


_register_lock = threading.Lock()


def _registered_name(kind: str, folder: Path, model_file: str, pooling: str = "") -> str:
    """A fastembed model name unique to this folder (and its registration parameters)."""
    digest = hashlib.sha1(f"{folder}|{model_file}|{pooling}".encode()).hexdigest()[:12]
    return f"axion-local/{kind}-{folder.name}-{digest}"


def _hidden_size(folder: Path) -> int | None:
    config = read_json(folder / "config.json")
    if isinstance(config, dict):
        for key in ("hidden_size", "d_model", "dim", "n_embd"):
            if valid_length(config.get(key)):
                return int(config[key])
    pooling = read_json(folder / "1_Pooling" / "config.json")
    if isinstance(pooling, dict) and valid_length(pooling.get("word_embedding_dimension")):
        return int(pooling["word_embedding_dimension"])
    return None


def _limit_fastembed_truncation(tok: Tokenizer | None, max_tokens: int) -> None:
    """Make fastembed's own tokenizer truncate at ``max_tokens`` (it reads only tokenizer_config.json)."""
    if tok is None:
        return
    truncation = tok.truncation or {}
    if truncation.get("max_length") != max_tokens:
        tok.enable_truncation(max_length=max_tokens, direction=truncation.get("direction", "right"))


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
            pooling = pooling_mode(name, local, None)
            fe_name = _registered_name("embed", local, model_file, pooling)
            dim = _hidden_size(local)
            with _register_lock:
                if not is_listed(fe_name, TextEmbedding.list_supported_models()):
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
        _stop_spinning(self._model.model)
        inner = self._model.model
        tok = getattr(inner, "tokenizer", None)
        fe_limit = valid_length(((tok.truncation if tok is not None else None) or {}).get("max_length"))
        st_limit = st_max_seq_length(name, local, None) if local is not None else None
        self.max_tokens = cap_tokens(fe_limit, st_limit)
        _limit_fastembed_truncation(tok, self.max_tokens)
        self._count_tok = counting_tokenizer(tok) if tok is not None else None
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
        return l2_normalise(np.stack(rows))


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
                if not is_listed(fe_name, TextCrossEncoder.list_supported_models()):
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
        _stop_spinning(self._model.model)
        tok = getattr(self._model.model, "tokenizer", None)
        fe_limit = valid_length(((tok.truncation if tok is not None else None) or {}).get("max_length"))
        self.max_tokens = cap_tokens(fe_limit)
        _limit_fastembed_truncation(tok, self.max_tokens)
        self._count_tok = counting_tokenizer(tok) if tok is not None else None

    def count_tokens(self, pairs: list[tuple[str, str]]) -> list[int]:
        if not pairs:
            return []
        assert self._count_tok is not None
        return [len(enc.ids) for enc in self._count_tok.encode_batch([tuple(p) for p in pairs])]

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        if not pairs:
            return []
        return [float(s) for s in self._model.rerank_pairs(list(pairs), batch_size=FASTEMBED_BATCH_SIZE)]
