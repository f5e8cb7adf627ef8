"""Embedding and rerank workers: every input (or query-document pair) of every job in one read becomes one
batched model call.

An idle worker that gets a job keeps reading while more arrive within a few milliseconds (`read_burst`), so 32
clients sending one sentence each cost a few forward passes, not 32. Inputs are sorted by length before the
call so the backend's internal batches pad little; results go back to their jobs in input order.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import msgspec
import numpy as np
import redis.asyncio as aioredis

from common import keys
from common.protocol import Embedded, EmbedJob, Failed, RerankJob, Scored, encode
from common.redis_cluster import publish
from common.settings import Settings
from workers import model_thread
from workers.revision import model_revision
from workers.stream_worker import Entry, StreamWorker

log = logging.getLogger("axion.worker.embed")

_embed_decoder = msgspec.json.Decoder(EmbedJob)
_rerank_decoder = msgspec.json.Decoder(RerankJob)
JOBS_PER_READ = 256


class EmbedWorker(StreamWorker):
    def __init__(self, settings: Settings, backend: Any, redis: aioredis.Redis,
                 kind: Literal["embed", "rerank"]) -> None:
        stream = (keys.embed_stream if kind == "embed" else keys.rerank_stream)(backend.model_id)
        super().__init__(settings, redis, kind=kind, model_id=backend.model_id, stream=stream,
                         revision=model_revision(backend.model_id),
                         device=getattr(backend, "device", "cpu"), dtype="float32")
        self.backend = backend
        self.kind = kind
        self.cross_request_batching = settings.embed_cross_request_batching
        self._answering: list[bytes] = []  # entries being answered: kept alive by the heartbeat
        self.calls = 0
        self.items = 0

    def refresh_stats(self) -> None:
        """Model calls and inputs so far, in the heartbeat's step counters: inputs per call is the batching."""
        super().refresh_stats()
        self.info.decode_steps, self.info.decoded_tokens = self.calls, self.items

    async def _one_call(self, fn: Any, inputs: list[Any], wanted: list[int], counts: list[int]) -> tuple[
            list[int], Any]:
        """The `wanted` inputs (of every job of the read) in one model call, shortest first so the backend's
        own batches pad little; returns their positions in call order and the results in the same order."""
        order = sorted(wanted, key=lambda i: counts[i])
        if not order:
            return [], []
        results = await model_thread.run(fn, [inputs[i] for i in order])
        self.calls += 1
        self.items += len(order)
        return order, results

    def in_flight(self) -> list[bytes]:
        return list(self._answering)

    async def iteration(self) -> None:
        entries, deliveries = await self.take_over_due(JOBS_PER_READ)
        per_read = JOBS_PER_READ if self.cross_request_batching else 1
        if not entries and self.batch_due():  # online first; batch lines only when it has none, a few per call
            entries = await self.read(per_read, block=False) or await self.read_batch(
                self.settings.max_batch_size if self.cross_request_batching else 1)
        if not entries:
            if self.cross_request_batching:
                entries = await self.read_burst(JOBS_PER_READ)
            else:
                entries = await self.read(1, block=True)
        if entries:
            self._answering = [entry_id for entry_id, _ in entries]
            try:
                await self._answer(entries, deliveries)
            finally:
                self._answering = []

    async def _answer(self, entries: list[Entry], deliveries: list[int] | None = None) -> None:
        jobs: list[tuple[bytes, Any]] = []
        pipe = self.redis.pipeline(transaction=False)
        decoder = _embed_decoder if self.kind == "embed" else _rerank_decoder
        for k, (entry_id, fields) in enumerate(entries):
            try:
                job = decoder.decode(fields[b"job"])
            except (KeyError, msgspec.DecodeError) as exc:
                log.error("dropping unreadable entry %s: %s", entry_id, exc)
                self.ack(pipe, entry_id)
                continue
            delivered = deliveries[k] if deliveries else 1
            if self.give_up_if_spent(pipe, entry_id, fields, job.request_id, job.model, delivered):
                continue
            jobs.append((entry_id, job))
        answers = await (self._embed(jobs) if self.kind == "embed" else self._rerank(jobs))
        for (entry_id, job), answer in zip(jobs, answers, strict=True):
            publish(pipe, keys.reply_channel(job.request_id), encode(answer))
            self.ack(pipe, entry_id)
        await pipe.execute()

    async def _embed(self, jobs: list[tuple[bytes, EmbedJob]]) -> list[Embedded | Failed]:
        refused: dict[int, Failed] = {}
        for k, (_, job) in enumerate(jobs):
            if job.token_inputs:  # OpenAI's token-array input: back to text by this model's tokenizer
                try:
                    job.texts = [self.backend.decode(ids) for ids in job.token_inputs]
                except ValueError as exc:
                    refused[k] = Failed(status=400, param="input", code="invalid_value", message=str(exc))
                    job.texts = []
        texts = [text for _, job in jobs for text in job.texts]
        counts: list[int] = await model_thread.run(self.backend.count_tokens, texts)
        answers: list[Embedded | Failed | None] = []
        wanted: list[int] = []  # positions in `texts` of the jobs that are not refused
        start = 0
        for _, job in jobs:
            span = range(start, start + len(job.texts))
            start += len(job.texts)
            refusal = refused.get(len(answers)) or self._refuse(job, [counts[i] for i in span])
            answers.append(refusal)
            if refusal is None:
                wanted.extend(span)
        vectors = np.zeros((len(texts), self.backend.dim), dtype=np.float32)
        order, rows = await self._one_call(self.backend.embed, texts, wanted, counts)
        if order:
            vectors[order] = rows
        start = 0
        for k, (_, job) in enumerate(jobs):
            part = slice(start, start + len(job.texts))
            start += len(job.texts)
            if answers[k] is None:
                rows = vectors[part]
                if job.dimensions is not None:
                    rows = rows[:, : job.dimensions]
                    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
                used = [min(c, self.backend.max_tokens) for c in counts[part]]
                answers[k] = Embedded(vectors=rows.astype("<f4").tobytes(), dim=rows.shape[1],
                                      prompt_tokens=sum(used), tokens=used)
        return answers  # type: ignore[return-value]

    def _refuse(self, job: EmbedJob, counts: list[int]) -> Failed | None:
        if job.dimensions is not None and job.dimensions > self.backend.dim:
            return Failed(status=400, param="dimensions", code="invalid_value",
                          message=f"'dimensions' must be at most {self.backend.dim} for this model.")
        too_long = [i for i, c in enumerate(counts) if c > self.backend.max_tokens]
        if too_long and not job.truncate:
            n = counts[too_long[0]]
            i = job.positions[too_long[0]] if job.positions else too_long[0]  # the client's index
            return Failed(status=400, param=f"input[{i}]", code="context_length_exceeded",
                          message=(f"Input {i} has {n} tokens; this model takes at most "
                                   f"{self.backend.max_tokens}. Send 'truncate': true to cut it."))
        return None

    async def _rerank(self, jobs: list[tuple[bytes, RerankJob]]) -> list[Scored | Failed]:
        """Every (query, document) pair of every job in one scoring call, sorted by length; scores go back to
        their jobs in document order."""
        pairs = [(job.query, doc) for _, job in jobs for doc in job.documents]
        counts: list[int] = await model_thread.run(self.backend.count_tokens, pairs)
        answers: list[Scored | Failed | None] = []
        wanted: list[int] = []
        start = 0
        for _, job in jobs:
            span = range(start, start + len(job.documents))
            start += len(job.documents)
            too_long = [i for i, k in enumerate(span) if counts[k] > self.backend.max_tokens]
            if too_long and not job.truncate:
                i = too_long[0]
                answers.append(Failed(status=400, param=f"documents[{i}]", code="context_length_exceeded",
                                      message=(f"Query and document {i} have {counts[span[i]]} tokens; this model "
                                               f"takes at most {self.backend.max_tokens}.")))
                continue
            answers.append(None)
            wanted.extend(span)
        logits = [0.0] * len(pairs)
        order, scores = await self._one_call(self.backend.score, pairs, wanted, counts)
        for k, x in zip(order, scores, strict=True):
            logits[k] = x
        start = 0
        for n, (_, job) in enumerate(jobs):
            span = range(start, start + len(job.documents))
            start += len(job.documents)
            if answers[n] is None:
                answers[n] = Scored(scores=[1 / (1 + math.exp(-logits[k])) for k in span],
                                    prompt_tokens=sum(min(counts[k], self.backend.max_tokens) for k in span))
        return answers  # type: ignore[return-value]
