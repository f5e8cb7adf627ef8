"""Open a worker for a model of any kind, showing progress and measuring the memory the model takes.

Progress: transformers and huggingface_hub draw their own tqdm bars (download, weight loading) on stderr, which
is the worker's log; they are switched on here unless HF_HUB_DISABLE_PROGRESS_BARS asks otherwise. Between
them, each load step logs a line `load <model> [i/n] <step>` with the time it took, so a slow load shows where
it is even when the bars are off (JSON logs).

Memory: parameter and buffer bytes of a torch model (exact, from the tensors), and the process RSS growth over
the load (every backend, fastembed's onnxruntime included). Both go into the worker's heartbeat and /health.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import time
from typing import Any, Literal

import msgspec
import psutil
import redis.asyncio as aioredis

from common.settings import Settings
from workers.stream_worker import StreamWorker

log = logging.getLogger("axion.worker.loading")

Kind = Literal["chat", "embed", "rerank"]


class Steps:
    """`load <model> [i/n] <step>` log lines, each with the time the previous step took."""

    def __init__(self, model: str, total: int) -> None:
        self.model, self.total, self.done = model, total, 0
        self.started = self._mark = time.monotonic()

    def next(self, what: str) -> None:
        now = time.monotonic()
        took = f" (previous step {now - self._mark:.2f}s)" if self.done else ""
        self.done += 1
        self._mark = now
        log.info("load %s [%d/%d] %s%s", self.model, self.done, self.total, what, took)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def enable_progress_bars() -> None:
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        return
    with contextlib.suppress(Exception):
        from huggingface_hub.utils import enable_progress_bars as hub_bars

        hub_bars()
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar()


def tensor_bytes(module: Any) -> tuple[int, int]:
    """(parameter bytes, buffer bytes) of a torch module; (0, 0) for anything else."""
    if not hasattr(module, "parameters"):
        return 0, 0
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return params, buffers


def rss() -> int:
    return psutil.Process().memory_info().rss


def freeze_heap() -> None:
    """Move every object alive now (the model, its tokenizer, the libraries) into the collector's permanent
    generation, so a full collection walks only what was made since: a full collection of a loaded worker's heap
    otherwise pauses every stream (bench/RESULTS.md). vLLM freezes its heap after start-up for the same reason."""
    gc.collect()
    gc.freeze()


def free_memory() -> None:
    """Give an unloaded model's memory back: unfreeze and collect it (`freeze_heap`), empty torch's CUDA cache,
    and ask glibc to return freed heap pages to the system (otherwise RSS stays high after an unload)."""
    gc.unfreeze()
    gc.collect()
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def open_chat(settings: Settings, redis: aioredis.Redis, model: str, served_name: str | None,
              fallback_reason: str | None = None) -> StreamWorker:
    """Load a chat model on the backend BACKEND picks for it (`workers/chat/choice.py`), or natively for
    `fallback_reason` (an external engine that could not start), and wrap it in a ChatWorker serving
    `served_name or model` (blocking: run it on the model thread). vLLM failing to start falls back to native."""
    from workers.chat.choice import BackendChoice, choose_backend
    from workers.chat.worker import ChatWorker

    gguf_file = settings.model_gguf_file if model == settings.model_name else None
    per_model = msgspec.structs.replace(settings, model_name=model, served_model_name=served_name,
                                        model_gguf_file=gguf_file)
    choice = BackendChoice("native", fallback_reason) if fallback_reason else choose_backend(per_model, model)
    if choice.backend == "external":  # a model loaded by a hot swap: the engine process serves MODEL_NAME only
        choice = BackendChoice("native", f"{choice.reason}, but the external engine serves MODEL_NAME only")
    log.info("backend for %s: %s (%s)", model, choice.backend, choice.reason)
    before = rss()
    backend, module, steps = None, None, Steps(model, 2)
    if choice.backend == "vllm":
        try:
            backend = _vllm_backend(per_model, model, steps)
        except Exception as exc:
            log.exception("vLLM cannot serve %s; falling back to the native engine", model)
            first = (str(exc).splitlines() or [""])[0][:200]
            choice = BackendChoice("native", f"fallback: vLLM failed to start ({type(exc).__name__}: {first})")
    if backend is None:
        steps = Steps(model, 3)
        backend, module = _native_backend(per_model, model, steps)
    worker = ChatWorker(per_model, backend, redis)
    worker.info.backend_reason = choice.reason
    _record(worker, module, before, steps)
    if module is not None and settings.quantization != "none":
        from workers.chat.quantize import weight_bytes

        worker.info.params_bytes = weight_bytes(module)  # quantized weights as stored, not as float32
    return worker


def _native_backend(settings: Settings, model: str, steps: Steps) -> tuple[Any, Any]:
    """Our transformers engine on MODEL_NAME's device, warmed up; the backend and its torch module."""
    import torch

    from workers.chat.engine import ChatEngine
    from workers.chat.loader import load_causal_lm
    from workers.chat.native import NativeBackend
    from workers.revision import load_variant, model_revision

    steps.next("tokenizer and weights")
    loaded = load_causal_lm(model, settings.device, gguf_file=settings.model_gguf_file,
                            quantization=settings.quantization, dtype_name=settings.dtype,
                            cpu_linear=settings.cpu_linear, batch_rows=settings.max_batch_size)
    steps.next("engine")
    engine = ChatEngine(loaded.model, loaded.tokenizer, loaded.device, settings.max_seq_len,
                        prefill_chunk_tokens=settings.prefill_chunk_tokens,
                        prefill_idle_tokens=settings.prefill_idle_tokens,
                        prefix_cache_tokens=settings.prefix_cache_tokens, decode_graphs=settings.decode_graphs,
                        graph_max_len=settings.graph_max_len, graph_prefill_tokens=settings.graph_prefill_tokens,
                        max_batch_size=settings.max_batch_size, decode_ahead=settings.decode_ahead)
    steps.next("warm-up forward pass")
    first = loaded.tokenizer.bos_token_id if loaded.tokenizer.bos_token_id is not None else 0
    with torch.no_grad():
        loaded.model(torch.tensor([[first]], device=loaded.device))
        captured = engine.capture_graphs()
    if captured:
        log.info("%s: captured %d decode graphs", model, captured)
    revision = model_revision(model, getattr(loaded.model.config, "_commit_hash", None)) + \
        load_variant(settings.model_gguf_file, settings.quantization)
    return NativeBackend(engine, str(loaded.dtype).removeprefix("torch."), revision), loaded.model


def _vllm_backend(settings: Settings, model: str, steps: Steps) -> Any:
    """vLLM's engine on `model` in this process (its engine core in child processes), started and warmed up."""
    from workers.chat.vllm_engine import open_vllm
    from workers.revision import model_revision

    steps.next("vLLM engine (weights, KV cache, compile)")
    backend = open_vllm(settings, model, model_revision(model) + "+vllm")
    steps.next("ready")
    return backend


def open_embed(settings: Settings, redis: aioredis.Redis, kind: Literal["embed", "rerank"],
               model: str) -> StreamWorker:
    """Load an embedding or rerank model (blocking: run in a thread) and wrap it in an EmbedWorker."""
    from workers.embed.backends import EmbeddingBackend, RerankBackend, load_embedding, load_reranker
    from workers.embed.worker import EmbedWorker

    steps = Steps(model, 2)
    before = rss()
    steps.next(f"{kind} model")
    backend: EmbeddingBackend | RerankBackend
    if kind == "embed":
        embedder = load_embedding(model, device=settings.embed_device, cache_dir=settings.fastembed_cache_path)
        steps.next("warm-up call")
        embedder.embed(["warm-up"])
        backend = embedder
    else:
        reranker = load_reranker(model, device=settings.embed_device, cache_dir=settings.fastembed_cache_path)
        steps.next("warm-up call")
        reranker.score([("warm", "up")])
        backend = reranker
    worker = EmbedWorker(settings, backend, redis, kind)
    worker.info.backend = getattr(backend, "backend", "")
    _record(worker, getattr(backend, "_model", None), before, steps)
    return worker


def _record(worker: StreamWorker, module: Any, rss_before: int, steps: Steps) -> None:
    info = worker.info
    info.params_bytes, info.buffers_bytes = tensor_bytes(module)
    info.load_rss_delta_bytes = max(0, rss() - rss_before)
    info.load_s = round(steps.elapsed(), 2)
    log.info("load %s done in %.2fs: parameters %.1f MiB, buffers %.1f MiB, process RSS +%.1f MiB",
             steps.model, info.load_s, info.params_bytes / 2**20, info.buffers_bytes / 2**20,
             info.load_rss_delta_bytes / 2**20)


def open_worker(settings: Settings, redis: aioredis.Redis, kind: Kind, model: str,
                served_name: str | None = None, fallback_reason: str | None = None) -> StreamWorker:
    """A worker for `model` of `kind`, loaded and warmed up, its heap frozen (blocking: run it in a thread)."""
    enable_progress_bars()
    if kind == "chat":
        worker = open_chat(settings, redis, model, served_name, fallback_reason)
    else:
        worker = open_embed(settings, redis, kind, model)
    freeze_heap()
    return worker


async def serve_chat_worker(settings: Settings) -> None:
    """One native chat worker for MODEL_NAME, built as `axion worker` builds it but without the hot-swap host, so
    several can share one process (tests/worker_host.py)."""
    from common import redis_client
    from workers import model_thread

    redis = redis_client.connect(settings, block_ms=settings.batch_timeout_ms)
    try:
        worker = await model_thread.run(open_chat, settings, redis, settings.model_name, settings.served_model_name)
        await worker.run()
    finally:
        await redis.aclose()
