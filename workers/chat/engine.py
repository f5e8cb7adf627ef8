"""The chat engine: a left-padded running batch that sequences join and leave between decoding steps.

Each step first spends a budget of prompt tokens on prefill (`workers/chat/prefill.py`: cached prefixes reused,
prompts of like length computed together, long ones chunked); a sequence whose prompt is done has its cache
left-padded and concatenated onto the running batch's cache. Then one batched forward pass decodes one token for
every running sequence. Finished or cancelled sequences' rows are dropped at once (their blocks, output included,
kept in the prefix cache) and columns that became padding in every row are trimmed. Positions come from the
attention mask, so padding never shifts a sequence's rotary positions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from transformers import DynamicCache

from common.protocol import Accepted, ChatJob, Event, Failed, Tokenized
from workers.chat.ahead import DecodeAhead
from workers.chat.grammar import GrammarCompiler
from workers.chat.graph_prefill import GraphPrefill, StaticKV, owned
from workers.chat.graphs import GraphDecoder
from workers.chat.graphs import unsupported as graphs_unsupported
from workers.chat.kv import KVLayer, kv_layers, layer_kv, pad_left
from workers.chat.logprobs import TokenBytes
from workers.chat.prefill import Prefill
from workers.chat.prefix_cache import PrefixCache
from workers.chat.prompt_scores import score_prompt
from workers.chat.sampling import banned_ids, needs_processing, process_row, sample_row, token_seed
from workers.chat.sequence import Sequence, advance, eos_token_ids, prepare, tokenize

log = logging.getLogger("axion.worker.engine")


class ChatEngine(Prefill, DecodeAhead):
    def __init__(self, model: Any, tokenizer: Any, device: torch.device, max_seq_len: int, *,
                 prefill_chunk_tokens: int = 512, prefill_idle_tokens: int = 2048,
                 prefix_cache_tokens: int = 0, decode_graphs: str = "off", graph_max_len: int = 1024,
                 graph_prefill_tokens: int = 2048, max_batch_size: int = 64, decode_ahead: bool = False) -> None:
        self.model = model
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefill_idle_tokens = max(prefill_idle_tokens, prefill_chunk_tokens)
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self.tokenizer = tokenizer
        self.device = device
        limit = getattr(model.config, "max_position_embeddings", None) or max_seq_len
        self.max_seq_len = min(max_seq_len, int(limit))
        self.eos_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None), model.config)
        self.vocab_size = int(getattr(model.config, "vocab_size", None) or len(tokenizer))
        self.token_bytes = TokenBytes(tokenizer)
        self._grammar_compiler: GrammarCompiler | None = None
        self.rows: list[Sequence] = []
        self.pending: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cached positions], 1 = real token
        self._feed: list[int] = []  # per row: the last sampled token, not yet in the cache
        self.released: list[Sequence] = []  # sequences that left the batch; the runner drains it to XACK
        self.decode_steps = 0
        self.decoded_tokens = 0
        self.prefilled_tokens = 0
        self.graphs: GraphDecoder | None = None
        self.prefill_graphs: GraphPrefill | None = None
        if decode_graphs == "on" or (decode_graphs == "auto" and device.type == "cuda"):
            max_len = min(graph_max_len, self.max_seq_len)
            reason = graphs_unsupported(model.config, max_len)
            if reason is None:
                self.graphs = GraphDecoder(model, max_batch_size, max_len, capture=device.type == "cuda")
                if graph_prefill_tokens > 0:
                    self.prefill_graphs = GraphPrefill(model, graph_prefill_tokens, max_batch_size, max_len,
                                                       self.graphs.capture, tokenizer.pad_token_id or 0)
            else:
                log.info("decode graphs off for this model (%s): decoding eagerly", reason)
        self.decode_ahead = decode_ahead and self.graphs is not None
        log.info("decode ahead: %s", "on while every row is plain greedy" if self.decode_ahead else "off")

    @property
    def active(self) -> int:
        return len(self.rows) + len(self.pending)

    # ---- admission -----------------------------------------------------------------------------------
    def prepare(self, job: ChatJob) -> Sequence | Failed:
        """Template and check the request; its first choice (siblings attached), or the Failed that refuses it."""
        return prepare(job, self.tokenizer, self.max_seq_len, self.vocab_size, self.device, self._grammars)

    def _grammars(self) -> GrammarCompiler:
        """Built on first use: walking the vocabulary takes up to a second, and most workers never need it."""
        if self._grammar_compiler is None:
            self._grammar_compiler = GrammarCompiler(self.tokenizer, self.vocab_size, eos_token_ids=self.eos_ids)
        return self._grammar_compiler

    def tokenize(self, job: ChatJob) -> Tokenized | Failed:
        return tokenize(job, self.tokenizer, self.max_seq_len, self.vocab_size)

    def add(self, seq: Sequence) -> Accepted:
        """Queue a prepared request: choice 0 and its siblings."""
        self.pending.extend([seq, *seq.siblings])
        return Accepted(prompt_tokens=len(seq.prompt_ids), prompt_text=seq.echo_text, reasoning=seq.reasoning)

    def cancel(self, request_id: str) -> None:
        for seq in self.rows + self.pending:
            if seq.request_id == request_id:
                seq.cancelled = True

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, Event]]:
        """Prefill, then one batched decoding step; one event per sequence per token it gained."""
        return self.prefill_step() + self.decode_step()

    @torch.inference_mode()
    def prefill_step(self) -> list[tuple[Sequence, Event]]:
        """Spend the prompt-token budget; a sequence whose prompt is done gets its first token (an event)."""
        events: list[tuple[Sequence, Event]] = []
        for seq in self.pending:
            if seq.scores_prompt and not seq.cancelled:  # before its first token, as readers expect
                seq.scores_prompt = False
                events.append((seq, score_prompt(self.model, seq.prompt_ids, seq.params.prompt_logprobs or 0,
                                                 self.token_bytes, self.device, self.vocab_size)))
        if self.pending:
            self._prefill(events)
            self._drop_finished()
        return events

    @torch.inference_mode()
    def decode_step(self) -> list[tuple[Sequence, Event]]:
        """One forward pass over every running sequence: one token (an event) each."""
        events: list[tuple[Sequence, Event]] = []
        self._drop_finished()  # cancelled since the last step: out before this pass, not after it
        if self.rows:
            if self.decode_ahead and self._can_decode_ahead():
                self._decode_ahead(events)
            else:
                self._settle(events)  # a step launched ahead is collected first
                self._drop_finished()
                if self.rows:
                    self._decode(events)
            self._drop_finished()
        return events

    @torch.inference_mode()
    def capture_graphs(self) -> int:
        """Capture every decode and prefill graph bucket now (worker warm-up); 0 without graphs. A model whose
        forward pass cannot be captured (it reads a value back to the host, say) runs eagerly instead of failing
        the worker's start."""
        built = 0
        try:
            built += self.graphs.capture_all() if self.graphs is not None else 0
        except RuntimeError as exc:
            log.warning("decode graphs off: capture failed (%s); decoding and prefilling eagerly", exc)
            self.graphs = self.prefill_graphs = None
        try:
            built += self.prefill_graphs.capture_all() if self.prefill_graphs is not None else 0
        except RuntimeError as exc:
            log.warning("prefill graphs off: capture failed (%s); prefilling eagerly", exc)
            self.prefill_graphs = None
        return built

    def kv_bytes(self) -> int:
        """Bytes held by the running batch's KV cache (prefix cache and prefilling sequences not included)."""
        if self.graphs is not None and self.graphs.holding:
            return self.graphs.held_bytes()
        cache = self._cache
        if cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in kv_layers(cache) for t in layer_kv(layer))

    def reset(self) -> list[Sequence]:
        """Drop every sequence (after a failed step); return them so the caller can report the failure."""
        dropped = self.rows + self.pending
        if self.graphs is not None:
            self.graphs.discard()
        self.rows, self.pending, self._feed, self._cache, self._mask = [], [], [], None, None
        self._inflight = None
        return dropped

    def _decode(self, events: list[tuple[Sequence, Event]]) -> None:
        live = [i for i, s in enumerate(self.rows) if s.finish_reason is None and not s.cancelled]
        if not live:
            return
        graphs = self.graphs
        if graphs is not None and graphs.holding and not graphs.has_room():
            self._cache, self._mask = graphs.unload()  # compacted: it may fit again right below
        if graphs is not None and not graphs.holding and self._mask is not None \
                and graphs.fits(len(self.rows), self._mask.shape[1]):
            graphs.load(self._cache, self._mask)
            self._cache = self._mask = None
        if graphs is not None and graphs.holding:
            logits = graphs.step(self._feed).float()
        else:
            assert self._cache is not None and self._mask is not None
            mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
            positions = (mask.sum(dim=1, keepdim=True) - 1).to(torch.long)
            inputs = torch.tensor([[t] for t in self._feed], device=self.device)
            out = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions,
                             cache=self._cache, use_cache=True)
            logits = out.logits[:, -1, :].float()
            self._mask = mask
        # Every row live (the usual case): no gather; _sample's in-place bans land in logits nobody reads again.
        tokens = self._sample(logits if len(live) == len(self.rows) else logits[live], [self.rows[i] for i in live])
        self.decode_steps += 1
        self.decoded_tokens += len(live)
        for seq in self.rows:
            seq.computed += 1  # the token fed this step is in the cache now
        for i, token in zip(live, tokens, strict=True):
            seq = self.rows[i]
            self._feed[i] = token
            events.append((seq, self._advance(seq, token)))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row. Logprobs come from the raw logits; masks and penalties apply per row only.

        The banned end-of-turn ids of every row go in one indexed write, not one per row: on a GPU each write
        is a host-to-device copy of its index list and a launch."""
        rows: list[int] = []
        cols: list[int] = []
        for row, seq in enumerate(seqs):
            if seq.params.logprobs:
                seq.pending_logprobs = torch.log_softmax(logits[row], dim=-1)
            banned = banned_ids(seq.params, len(seq.output_ids), self.eos_ids)
            rows += [row] * len(banned)
            cols += banned
        if rows:
            index = torch.tensor([rows, cols], device=logits.device)
            logits[index[0], index[1]] = float("-inf")
        for row, seq in enumerate(seqs):
            if needs_processing(seq.params):
                process_row(logits[row], seq.params, seq.prompt_ids, seq.output_ids)
            if seq.matcher is not None:
                seq.matcher.mask_logits(logits[row])
        greedy = [r for r, s in enumerate(seqs) if s.params.temperature == 0.0]
        tokens = [0] * len(seqs)
        if greedy:
            picks = torch.argmax(logits if len(greedy) == len(seqs) else logits[greedy], dim=-1).tolist()
            for r, t in zip(greedy, picks, strict=True):
                tokens[r] = int(t)
        for r, seq in enumerate(seqs):
            if seq.params.temperature != 0.0:
                try:
                    tokens[r] = sample_row(logits[r], seq.params, seq.generator,
                                           token_seed(seq.seed, len(seq.output_ids)))
                except (RuntimeError, ValueError) as exc:  # fail this request only, never the batch
                    log.warning("sampling failed for %s: %s", seq.request_id, exc)
                    seq.error = "Sampling failed for these parameters."
        return tokens

    def _advance(self, seq: Sequence, token: int) -> Event:
        return advance(seq, token, self.eos_ids, self.max_seq_len, self.token_bytes)

    # ---- batch bookkeeping ---------------------------------------------------------------------------
    def _merge(self, cache: DynamicCache | StaticKV, mask: torch.Tensor, tokens: list[int],
               seqs: list[Sequence]) -> None:
        """New rows go into the static buffers when those hold the batch, or can; else into the eager cache."""
        graphs = self.graphs
        if graphs is not None and graphs.holding and not graphs.insert(cache, mask):
            self._cache, self._mask = graphs.unload()  # no room left: the batch goes on eagerly (or compacted)
        if graphs is not None and graphs.holding:
            pass
        elif self._cache is None or self._mask is None:
            if graphs is not None and graphs.fits(mask.shape[0], mask.shape[1]):
                graphs.load(cache, mask)
            else:
                self._cache, self._mask = owned(cache, self.model.config), mask
        else:
            length = max(self._mask.shape[1], mask.shape[1])
            their_layers: Iterable[KVLayer] = cache.layers if isinstance(cache, StaticKV) else kv_layers(cache)
            for mine, theirs in zip(kv_layers(self._cache), their_layers, strict=True):
                (my_keys, my_values), (their_keys, their_values) = layer_kv(mine), layer_kv(theirs)
                mine.keys = torch.cat([pad_left(my_keys, length), pad_left(their_keys, length)], dim=0)
                mine.values = torch.cat([pad_left(my_values, length), pad_left(their_values, length)], dim=0)
            self._mask = torch.cat([pad_left(self._mask, length), pad_left(mask, length)], dim=0)
        self.rows.extend(seqs)
        self._feed.extend(tokens)

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.rows) if s.finish_reason is None and not s.cancelled]
        if len(keep) == len(self.rows):
            return
        kept = set(keep)
        leaving = [i for i in range(len(self.rows)) if i not in kept]
        self._store_finished(leaving)
        self.released.extend(self.rows[i] for i in leaving)
        if not keep:
            if self.graphs is not None:
                self.graphs.discard()  # the whole batch left: nothing to copy back
            self.rows, self._feed, self._cache, self._mask = [], [], None, None
            self._inflight = None  # a step launched ahead for them only
            return
        if self.graphs is not None and self.graphs.holding:
            self.graphs.release(leaving)
            self.rows = [self.rows[i] for i in keep]
            self._feed = [self._feed[i] for i in keep]
            return
        assert self._cache is not None and self._mask is not None
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        start = int(torch.nonzero(mask.any(dim=0))[0])  # leading columns that are padding in every row
        for layer in kv_layers(self._cache):
            keys, values = layer_kv(layer)
            layer.keys = keys.index_select(0, index)[:, :, start:]
            layer.values = values.index_select(0, index)[:, :, start:]
        self._mask = mask[:, start:]
        self.rows = [self.rows[i] for i in keep]
        self._feed = [self._feed[i] for i in keep]

    def _store_finished(self, rows: list[int]) -> None:
        """Keep the blocks of what the leaving rows computed, their output included: a chat's next turn sends
        the answer back inside its prompt, and finds it cached (as far as its template re-tokenizes the answer to
        the same tokens). How many positions a row has is counted on the host (`computed`). In the eager batch
        they are its last columns; in the static graph buffers they are gathered by its mask."""
        graphs = self.graphs
        held = graphs is not None and graphs.holding
        if not rows or not self.prefix_cache.enabled or (not held and (self._cache is None or self._mask is None)):
            return
        for i in rows:
            seq = self.rows[i]
            if seq.finish_reason == "error":
                continue
            ids = (seq.prompt_ids + seq.output_ids)[:seq.computed]
            if graphs is not None and held:
                self.prefix_cache.store(ids, graphs.row_kv(i, seq.computed))
            else:
                assert self._cache is not None and self._mask is not None  # checked above when not held
                self.prefix_cache.store(ids, self._cache, row=i, offset=self._mask.shape[1] - seq.computed)
