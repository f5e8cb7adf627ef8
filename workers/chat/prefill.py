"""The engine's prefill phase: a budget of prompt tokens per step, spent oldest arrival first.

A new sequence starts from the longest cached prefix of its prompt (`prefix_cache`); the rests of the prompts that
fit the budget are computed together in left-padded passes of like length (`kv.padding_groups`), and a prompt too
long for it computes chunks on its own cache, so it is spread over several steps instead of stalling the running
decodes. A sequence whose prompt is done samples its first token and joins the running batch. `ChatEngine` mixes
this in, as it does `DecodeAhead`: it owns the rows, the batch cache and the sampling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from common.protocol import Event
from workers.chat.graph_prefill import GraphPrefill, StaticKV
from workers.chat.kv import new_cache, padding_groups, stack_past
from workers.chat.prefix_cache import BLOCK, PrefixCache
from workers.chat.sequence import replay

if TYPE_CHECKING:
    from workers.chat.sequence import Sequence


SHARED_MIN = 2 * BLOCK  # uncached prompt tokens an arrival must share with one taken this step to wait for it


class Leaders:
    """The prompts a prefill step takes, keyed by their first SHARED_MIN tokens past what the prefix cache held
    for them. A later arrival that starts with the same tokens waits one step and then finds them cached, instead
    of computing them again in the same pass (SGLang's "in-batch prefix caching"; figures in bench/RESULTS.md).

    Two prompts that share those tokens past a cached prefix share that prefix too (the cache is keyed by
    content), so an arrival is checked at each cached length the leaders had."""

    def __init__(self) -> None:
        self._keys: dict[int, set[int]] = {}  # cached length -> hashes of the prompts' first (length + SHARED_MIN)

    def add(self, ids: list[int], cached: int) -> None:
        if len(ids) >= cached + SHARED_MIN:
            self._keys.setdefault(cached, set()).add(hash(tuple(ids[:cached + SHARED_MIN])))

    def followed_by(self, ids: list[int]) -> bool:
        return any(len(ids) > cached + SHARED_MIN and hash(tuple(ids[:cached + SHARED_MIN])) in keys
                   for cached, keys in self._keys.items())


class Prefill:
    """The engine's side of prefilling; `ChatEngine` mixes it in."""

    model: Any
    tokenizer: Any
    device: torch.device
    rows: list[Sequence]
    pending: list[Sequence]
    released: list[Sequence]
    prefix_cache: PrefixCache
    prefill_graphs: GraphPrefill | None
    prefill_chunk_tokens: int
    prefill_idle_tokens: int
    prefilled_tokens: int

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        raise NotImplementedError

    def _merge(self, cache: DynamicCache | StaticKV, mask: torch.Tensor, tokens: list[int],
               seqs: list[Sequence]) -> None:
        raise NotImplementedError

    def _advance(self, seq: Sequence, token: int) -> Event:
        raise NotImplementedError

    def _prefill(self, events: list[tuple[Sequence, Event]]) -> None:
        """Spend the budget oldest first. Every prompt whose rest fits what is left goes through a left-padded
        forward pass with the others of like length (fresh ones, and ones continuing a cached prefix or earlier
        chunks; `kv.padding_groups`); a prompt too long for what is left computes a chunk on its own cache and
        waits for the next step. A new prompt that shares its first uncached tokens with one taken this step
        waits for the next step too, to reuse them (`Leaders`).

        The budget is there so a long prompt does not stall the streams that are decoding. With none decoding
        it protects nobody, so it is PREFILL_IDLE_TOKENS instead: a burst of requests that arrives at an idle
        worker (clients that all got their answers and send again) prefills in one pass and then decodes in
        step, instead of being cut into groups that keep finishing, and restarting, a step or more apart."""
        budget = self.prefill_chunk_tokens if self.rows else self.prefill_idle_tokens
        waiting: list[Sequence] = []
        together: list[Sequence] = []
        leaders = Leaders() if self.prefix_cache.enabled else None
        for seq in self.pending:
            if seq.cancelled:
                seq.cache = None
                self.released.append(seq)
                continue
            if budget <= 0:
                waiting.append(seq)
                continue
            if seq.cache is None:
                if leaders is not None and leaders.followed_by(seq.prefill_ids):
                    waiting.append(seq)  # next step it finds the leader's blocks in the prefix cache
                    continue
                seq.cache, seq.computed = self.prefix_cache.lookup(seq.prefill_ids, self.model.config)
                seq.cached_tokens = seq.computed
            if leaders is not None:
                leaders.add(seq.prefill_ids, seq.cached_tokens)
            remaining = len(seq.prefill_ids) - seq.computed
            if remaining <= budget:
                together.append(seq)
                budget -= remaining
                continue
            chunk = torch.tensor([seq.prefill_ids[seq.computed:seq.computed + budget]], device=self.device)
            self.model(input_ids=chunk, cache=seq.cache, use_cache=True, logits_to_keep=1)
            seq.computed += budget
            self.prefilled_tokens += budget
            budget = 0
            waiting.append(seq)
        rests = [len(seq.prefill_ids) - seq.computed for seq in together]
        for group in padding_groups(rests):
            self._prefill_together([together[i] for i in group], events)
        self.pending = waiting

    def _prefill_together(self, seqs: list[Sequence], events: list[tuple[Sequence, Event]]) -> None:
        """One pass over the rest of every prompt, right-aligned to the longest rest (`width`). A row keeps the
        part of its cache (cached prefix, earlier chunks) that ends where its input starts, and recomputes the
        positions its input would otherwise pad: the pass computes every padded position anyway, and the rows
        stay contiguous at the right end (padding only on the left, which the batch cache and the prefix cache's
        `store` rely on); continuations of cached prefixes join the same pass instead of one pass each.

        With the prefill graphs (CUDA), prompts that fit a captured bucket replay it from an empty cache, their
        cached prefixes recomputed, as long as that is no more positions than the pass computes anyway: an
        eager pass costs a GPU's host far more, and templates with a fixed header give almost every prompt a
        cached first block, which would keep it off the graphs."""
        lengths = [len(s.prefill_ids) for s in seqs]
        width = max(n - s.computed for n, s in zip(lengths, seqs, strict=True))
        keeps = [max(0, n - width) for n in lengths]
        graphs = self.prefill_graphs
        replay = graphs is not None and graphs.bucket(len(seqs), max(lengths)) is not None \
            and 2 * sum(keeps) <= sum(lengths)
        if replay:
            keeps = [0] * len(seqs)
        past = max(keeps)
        for seq, n, keep in zip(seqs, lengths, keeps, strict=True):
            kept = min(seq.cached_tokens, keep)
            self.prefix_cache.recomputed(seq.cached_tokens - kept)  # found, then computed again in this pass
            seq.cached_tokens = kept
            self.prefilled_tokens += n - keep
        if replay:
            assert graphs is not None
            static, mask, last = graphs.run([s.prefill_ids for s in seqs])
            for seq in seqs:
                seq.cache, seq.computed = None, len(seq.prefill_ids)
            self._join(seqs, static, mask, last, events)
            return
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - n + k) + s.prefill_ids[k:] for s, n, k in zip(seqs, lengths, keeps,
                           strict=True)], device=self.device)
        mask = torch.tensor([[0] * (past + width - n) + [1] * n for n in lengths], device=self.device)
        cache = stack_past([(s.cache, k) for s, k in zip(seqs, keeps, strict=True)], self.model.config) if past \
            else new_cache(self.model.config)
        kwargs = {} if len(seqs) == 1 else {"attention_mask": mask,
                                            "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0)[:, past:]}
        out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
        for seq in seqs:
            seq.cache, seq.computed = None, len(seq.prefill_ids)
        self._join(seqs, cache, mask, out.logits[:, -1, :], events)

    def _join(self, seqs: list[Sequence], cache: DynamicCache | StaticKV, mask: torch.Tensor, last_logits: torch.Tensor,
              events: list[tuple[Sequence, Event]]) -> None:
        """Prompts done: keep their blocks for reuse, sample each first token, move the rows into the batch."""
        length = mask.shape[1]
        for row, seq in enumerate(seqs):
            self.prefix_cache.store(seq.prefill_ids, cache, row=row, offset=length - len(seq.prefill_ids))
        fresh = [(row, seq) for row, seq in enumerate(seqs) if not seq.resume]
        sampled = self._sample(last_logits[[row for row, _ in fresh]].float(), [seq for _, seq in fresh])
        tokens = [seq.resume[-1] if seq.resume else 0 for seq in seqs]
        for (row, _), token in zip(fresh, sampled, strict=True):
            tokens[row] = token
        self._merge(cache, mask, tokens, seqs)
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.resume:
                events += replay(seq, self._advance)
            else:
                events.append((seq, self._advance(seq, token)))
