"""The native backend: our transformers engine (`workers/chat/engine.py`) behind the backend contract.

Each step runs on the model thread (`workers/model_thread.py`) in two phases, each published at once: prefill
(a new request's first token goes out before the batch decodes) and one decoding pass over every running row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from common.protocol import Accepted, ChatJob, Event, Failed, Tokenized, WorkerInfo
from workers import model_thread
from workers.chat.backend import Publish
from workers.chat.engine import ChatEngine
from workers.chat.quantize import weight_bytes
from workers.chat.sequence import Sequence

log = logging.getLogger("axion.worker")


class NativeBackend:
    name = "native"

    def __init__(self, engine: ChatEngine, dtype: str, revision: str) -> None:
        self.engine = engine
        self.device = str(engine.device)
        self.dtype = dtype
        self.vocab_size = engine.vocab_size
        self.revision = revision

    @property
    def active(self) -> int:
        return self.engine.active

    @property
    def pending(self) -> list[Sequence]:
        return self.engine.pending

    def running(self) -> list[Sequence]:
        return self.engine.rows + self.engine.pending

    def prepare(self, job: ChatJob) -> Sequence | Failed:
        return self.engine.prepare(job)

    def tokenize(self, job: ChatJob) -> Tokenized | Failed:
        return self.engine.tokenize(job)

    def add(self, seq: Sequence) -> Accepted:
        return self.engine.add(seq)

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)

    async def step(self, publish: Publish) -> bool:
        """Prefill, publish (first tokens go out at once), decode, publish. The phases run strictly one after
        another: overlapping the publish with the decoding pass was measured slower on two cores, as this loop's
        Python then competes with torch for the GIL and the cores (docs/design/native-step.md)."""
        if self.engine.pending:
            await publish(*await self._in_model_thread(self.engine.prefill_step), False)
        if not self.engine.rows:
            return False
        await publish(*await self._in_model_thread(self.engine.decode_step), True)
        return True

    async def _in_model_thread(self, phase: Callable[[], list[tuple[Sequence, Event]]]) -> tuple[
            list[tuple[Sequence, Event]], list[Sequence]]:
        """An engine phase on the model thread: its events and the sequences that left the batch. A failed phase
        fails every sequence in the batch, never the worker."""
        def run() -> tuple[list[tuple[Sequence, Event]], list[Sequence]]:
            events = phase()
            released, self.engine.released = self.engine.released, []
            return events, released

        try:
            return await model_thread.run(run)
        except Exception:
            log.exception("engine step failed; failing the %d sequences in the batch", self.engine.active)
            failure = Failed(status=500, message="The model failed while generating.", type="server_error",
                             code="engine_error")
            dropped = self.engine.reset()
            released, self.engine.released = self.engine.released + dropped, []
            return [(seq, failure) for seq in dropped], released

    def stats(self, info: WorkerInfo) -> None:
        engine = self.engine
        info.active_sequences = engine.active
        info.running_sequences, info.waiting_sequences = len(engine.rows), len(engine.pending)
        info.decode_steps, info.decoded_tokens = engine.decode_steps, engine.decoded_tokens
        info.prefilled_tokens = engine.prefilled_tokens
        info.kv_cache_bytes = engine.kv_bytes()
        info.prefix_cache_bytes = engine.prefix_cache.nbytes
        info.prefix_cache_hits = engine.prefix_cache.hits
        info.prefix_cache_hit_tokens = engine.prefix_cache.reused_tokens
        info.prefix_cache_query_tokens = engine.prefilled_tokens + engine.prefix_cache.reused_tokens
        info.weights_bytes = weight_bytes(engine.model)  # quantized weights counted as stored
        if engine.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(engine.device)
            info.device_memory_used_bytes, info.device_memory_total_bytes = total - free, total

    def summary(self) -> str:
        engine = self.engine
        return (f"{engine.decode_steps} decode steps, mean batch "
                f"{engine.decoded_tokens / max(1, engine.decode_steps):.2f}, {engine.prefilled_tokens} prompt tokens "
                f"computed, {engine.prefix_cache.reused_tokens} reused from the prefix cache")

    async def close(self) -> None:
        """Nothing to stop: the host drops the worker and frees the model's memory (`loading.free_memory`)."""
