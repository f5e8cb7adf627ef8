"""The contract between the chat worker's job lifecycle (`workers/chat/worker.py`) and an engine.

The worker owns what every engine shares: reading jobs, decoding and version checks, deadlines, takeover of a dead
worker's jobs, publishing events with their progress, cancel flags and acknowledgements. A backend owns the model:
it turns a job into sequences (`prepare`), runs them (`step`, which hands each batch of events to the worker's
`publish`), stops them (`cancel`) and reports its figures (`stats`). Backends: `native` (our transformers engine,
`workers/chat/native.py`) and `vllm` (vLLM's engine in this process, `workers/chat/vllm_engine.py`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from common.protocol import Accepted, ChatJob, Event, Failed, Tokenized, WorkerInfo
from workers.chat.sequence import Sequence

#: publish(events, released, read): one pipeline to Redis. `released` are the sequences that left the engine (the
#: worker acknowledges a job once all its choices have); `read` also reads new jobs and the running cancel flags.
Publish = Callable[[list[tuple[Sequence, Event]], list[Sequence], bool], Awaitable[None]]


class ChatBackend(Protocol):
    name: str  # "native" or "vllm": shown in the heartbeat, /health, /v1/models and `axion models list`
    device: str
    dtype: str
    vocab_size: int
    revision: str  # the loaded model's version (workers/revision.py), engine and variant included: cache keys

    @property
    def active(self) -> int:
        """Sequences admitted and not yet released."""

    @property
    def pending(self) -> list[Sequence]:
        """Admitted sequences that have not started computing; the worker may reorder them (online first)."""

    def running(self) -> list[Sequence]:
        """Every admitted sequence not yet released."""

    def prepare(self, job: ChatJob) -> Sequence | Failed:
        """Template and check a generate job: its first choice (siblings attached), or the Failed refusing it."""

    def tokenize(self, job: ChatJob) -> Tokenized | Failed:
        """Answer a tokenize or detokenize job."""

    def add(self, seq: Sequence) -> Accepted:
        """Start a prepared request (choice 0 and its siblings); `seq.resume` holds tokens a dead worker made."""

    def cancel(self, request_id: str) -> None:
        """Stop a request's sequences; they are released at the next step without a final event."""

    async def step(self, publish: Publish) -> bool:
        """Advance every running sequence once, handing each batch of events to `publish`; True when a publish
        with `read` ran (the worker then need not read new jobs itself)."""

    def stats(self, info: WorkerInfo) -> None:
        """Write the engine's figures into the heartbeat."""

    def summary(self) -> str:
        """One line of totals for the worker's last log line."""

    async def close(self) -> None:
        """Release the engine (processes, memory) after the last step."""
