"""Decoding one step ahead (DECODE_AHEAD): the GPU computes step t+1 while the host turns step t into events.

With decode graphs a step's GPU work is one replay, and what is left is the host's: reading the tokens back,
detokenizing, stop strings, the events, and the worker's Redis round trip. Done in line, the GPU idles through
all of it. Here, while every running sequence is greedy with nothing to apply on the host (no logprobs,
penalties, logit bias or grammar), a step's tokens are picked on the device and fed straight into the next
step, which is launched before the host reads the previous step's tokens back, so the host's work overlaps the
GPU's. A sequence that the host then finds finished (its length, a stop string, EOS) has had one extra token
computed; it is dropped. As soon as a sequence that needs the host joins, the step in flight is collected
("settled") and decoding goes on one step at a time; on a CPU the same path runs with no overlap, for the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from common.protocol import Event
from workers.chat.sampling import banned_ids, needs_processing

if TYPE_CHECKING:
    from workers.chat.sequence import Sequence


@dataclass
class InFlight:
    seqs: list[Sequence]  # the batch rows the step computed, in row order
    tokens: torch.Tensor  # their tokens, on the host once `ready` has fired
    ready: Any  # a CUDA event; None on a CPU


def eligible(seq: Sequence) -> bool:
    """Whether the sequence's next token can be picked on the device: greedy, nothing applied on the host."""
    params = seq.params
    return (params.temperature == 0.0 and not params.logprobs and not needs_processing(params)
            and seq.matcher is None and seq.error is None)


class DecodeAhead:
    """The engine's side of decoding ahead; `ChatEngine` mixes it in (it owns rows, feeds, graphs, events)."""

    rows: list[Sequence]
    _feed: list[int]
    graphs: Any
    eos_ids: list[int]
    decode_steps: int
    decoded_tokens: int
    _inflight: InFlight | None = None
    steps_ahead = 0  # steps launched before the one before them was read back

    def _advance(self, seq: Sequence, token: int) -> Event:
        raise NotImplementedError

    def _can_decode_ahead(self) -> bool:
        graphs = self.graphs
        return (graphs is not None and graphs.holding and graphs.has_room()
                and all(eligible(s) for s in self.rows))

    def _decode_ahead(self, events: list[tuple[Sequence, Event]]) -> None:
        """Launch the next step, then collect the one before it (if any) into `events`."""
        previous = self._inflight
        self._inflight = self._launch()
        if previous is not None:
            self.steps_ahead += 1
            self._collect(previous, events)

    def _launch(self) -> InFlight:
        """Every host-to-device copy comes before the replay: a blocking one synchronises the stream, so after
        the replay it would wait for this very step and the host would overlap nothing."""
        graphs = self.graphs
        rows = list(self.rows)
        ahead = {id(s) for s in self._inflight.seqs} if self._inflight is not None else set()
        bans = self._bans(rows, ahead, graphs.device)
        graphs.prime()
        if self._inflight is None:
            logits = graphs.step(self._feed)
        else:
            fresh = [i for i, s in enumerate(rows) if id(s) not in ahead]
            if fresh:
                graphs.feed_rows(fresh, [self._feed[i] for i in fresh])
            logits = graphs.step(None)
        for seq in rows:
            seq.computed += 1  # the token fed to this step is in the cache once it runs
        tokens = self._pick(logits, bans)
        graphs.feed_on_device(tokens)
        if tokens.device.type == "cuda":
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return InFlight(rows, host, ready)
        return InFlight(rows, tokens, None)

    def _bans(self, rows: list[Sequence], ahead: set[int], device: torch.device) -> torch.Tensor | None:
        """The (row, token) pairs to ban, as `_sample` bans end-of-turn ids, on the device ([2, n]), or None: a row
        whose token is still in flight is one token further on than its `output_ids` say."""
        pairs: list[tuple[int, int]] = []
        for row, seq in enumerate(rows):
            produced = len(seq.output_ids) + (1 if id(seq) in ahead else 0)
            pairs += [(row, token) for token in banned_ids(seq.params, produced, self.eos_ids)]
        return torch.tensor(pairs, device=device).T if pairs else None

    @staticmethod
    def _pick(logits: torch.Tensor, bans: torch.Tensor | None) -> torch.Tensor:
        """Greedy tokens on the device, the `bans` pairs excluded (the caller's logits are left as they were)."""
        if bans is not None:
            logits = logits.clone()
            logits[bans[0], bans[1]] = float("-inf")
        return torch.argmax(logits, dim=-1)

    def _collect(self, step: InFlight, events: list[tuple[Sequence, Event]]) -> None:
        """A launched step's tokens, read back: the events of the sequences still running."""
        if step.ready is not None:
            step.ready.synchronize()
        where = {id(s): i for i, s in enumerate(self.rows)}
        live = 0
        for seq, token in zip(step.seqs, step.tokens.tolist(), strict=True):
            if seq.finish_reason is not None or seq.cancelled:
                continue  # finished by the step before: this token was computed ahead for nothing
            if id(seq) in where:
                self._feed[where[id(seq)]] = token
            events.append((seq, self._advance(seq, token)))
            live += 1
        self.decode_steps += 1
        self.decoded_tokens += live

    def _settle(self, events: list[tuple[Sequence, Event]]) -> None:
        """Collect the step in flight, so the batch can go on one step at a time."""
        step, self._inflight = self._inflight, None
        if step is not None:
            self._collect(step, events)
