"""Grammar-constrained decoding for structured output (``response_format``, later forced tool calls).

Prototype on llguidance (MIT, Microsoft/guidance-ai), picked by measurement over xgrammar and outlines-core:
it computes each token mask lazily from an Earley parser over the tokenizer's token trie, so a new schema costs
about a millisecond instead of a per-schema precompute (tens of ms to seconds for the others at a 50k vocab),
and in our tests it never let invalid JSON through. Its wheel has no dependencies, so it cannot move the torch
or transformers pins.

The engine owns one :class:`GrammarCompiler` per tokenizer and one :class:`Matcher` per constrained row; each
decoding step calls :meth:`Matcher.mask_logits` on the row before sampling and :meth:`Matcher.accept` with the
sampled token. The library is imported on first use only, so a worker without it still starts and serves
unconstrained requests; a constrained request then fails with a clear RuntimeError.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Literal

import numpy as np
import torch

from common.protocol import GuidedDecoding

# Whitespace between JSON tokens: flexible (models trained on pretty-printed JSON keep their newlines and
# indentation) but bounded, so a degenerate model cannot spin on whitespace until max_tokens.
# At most one space between JSON tokens: a weak model otherwise spends its budget on whitespace (measured: a
# random model given up to 32 whitespace characters per gap ran to max_tokens). Compact JSON, as OpenAI emits.
JSON_WHITESPACE = r"\x20?"
_CACHE_ENTRIES = 256


def _llguidance() -> Any:
    """Import llguidance on first use, so its absence only fails the requests that need it."""
    try:
        import llguidance
        import llguidance.hf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "structured output needs the 'llguidance' package (pip install 'llguidance>=1.9,<2')"
        ) from exc
    return llguidance


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")


def _close_objects(schema: Any) -> Any:
    """OpenAI strict mode: an object admits only its declared properties. Set ``additionalProperties: false``
    on every object subschema that does not say otherwise. Walks subschema positions only (a property that is
    itself named "properties" stays a name), and returns a copy: the caller's dict is untouched."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _close_objects(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_close_objects(sub) for sub in out[key]]
    for key in _SCHEMA_ONE:
        if key in out:
            out[key] = _close_objects(out[key])
    kind = out.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in out
    if is_object and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def json_constraint(kind: str, schema: dict[str, Any] | None = None, strict: bool = False,
                    whitespace: str | None = None) -> dict[str, Any]:
    """The JSON schema a `response_format` enforces, with llguidance's options inside (`x-guidance`), so the native
    engine and vLLM's guidance backend enforce the same thing: `json_object` is any object; `json_schema` with
    ``strict`` (OpenAI's default for structured outputs) closes every object and makes an unsupported keyword an
    error, so the output is guaranteed to validate; without it, unknown keywords are skipped (best effort).
    `whitespace` replaces the default pattern of the gaps between JSON tokens ("" allows none)."""
    options: dict[str, Any] = {"whitespace_pattern": JSON_WHITESPACE if whitespace is None else whitespace}
    if kind == "json_object":
        return {"type": "object", "x-guidance": options}
    options["lenient"] = not strict
    return {**(_close_objects(schema) if strict else (schema or {})), "x-guidance": options}


def choice_grammar(choices: list[str]) -> str:
    """A Lark grammar whose only sentences are `choices` (JSON string literals are Lark's)."""
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def lark_grammar(text: str) -> str:
    """A grammar in llguidance's Lark dialect, or in GBNF (`::=` rules, as llama.cpp and xgrammar take), as Lark."""
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return str(any_to_lark(text))
    except Exception as exc:  # the converter raises its own error types on malformed GBNF
        raise ValueError(f"invalid grammar: {exc}") from None


def constraint_source(guided: GuidedDecoding) -> tuple[Literal["json", "regex", "grammar"], Any]:
    """A request's output constraint as llguidance (ours, and vLLM's guidance backend) takes it: a JSON schema with
    our options, a regex, or a Lark grammar; the kind is vLLM's `StructuredOutputsParams` field for it."""
    if guided.kind in ("json_object", "json_schema"):
        if guided.kind == "json_schema" and not isinstance(guided.schema or {}, dict):
            raise ValueError("a JSON schema must be an object")
        return "json", json_constraint(guided.kind, guided.schema, guided.strict, guided.whitespace)
    if guided.kind == "regex":
        return "regex", guided.text or ""
    if guided.kind == "choice":
        return "grammar", choice_grammar(guided.choices or [])
    return "grammar", lark_grammar(guided.text or "")


class GrammarCompiler:
    """One per tokenizer: holds llguidance's view of the vocabulary and caches grammars by key.

    Building the tokenizer view walks the whole vocabulary (about 1 s for 512 tokens to 2.5 s for 50k on one
    CPU core), so do it once at worker start. Grammars themselves are cheap (~1 ms) but are still cached,
    because clients resend the same schema with every request.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, *, eos_token_ids: list[int] | None = None) -> None:
        """``vocab_size`` is the model's logits width; it may exceed ``len(tokenizer)`` (padded lm_head), and
        the ids past the tokenizer are never allowed. ``eos_token_ids`` defaults to the tokenizer's EOS; pass
        the engine's full stop-id list so any of them ends a completed grammar."""
        llg = _llguidance()
        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        eos: int | list[int] | None = list(eos_token_ids) if eos_token_ids else None
        self._llg = llg
        self._tokenizer = llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    # ---- grammar kinds -------------------------------------------------------------------------------
    def guided(self, guided: GuidedDecoding) -> Grammar:
        """The grammar of a request's output constraint, whichever field it came from (`constraint_source`)."""
        kind, source = constraint_source(guided)
        if kind == "json":
            return self.json(source)
        return self.regex(source) if kind == "regex" else self.lark(source)

    def json(self, constraint: dict[str, Any]) -> Grammar:
        """A JSON schema with llguidance's options inside (`json_constraint`)."""
        key = "schema:" + json.dumps(constraint, sort_keys=True)
        return self._get(key, lambda: self._llg.LLMatcher.grammar_from_json_schema(constraint))

    def regex(self, pattern: str) -> Grammar:
        """Output must match ``pattern`` in full (for fixed formats, e.g. a tool-call envelope)."""
        return self._get("regex:" + pattern, lambda: self._llg.LLMatcher.grammar_from_regex(pattern))

    def lark(self, grammar: str) -> Grammar:
        """A context-free grammar in llguidance's Lark dialect; ``%json {schema}`` embeds a JSON schema, which
        is how a forced tool call (fixed text around schema-checked arguments) will be expressed."""
        return self._get("lark:" + grammar, lambda: self._llg.LLMatcher.grammar_from_lark(grammar))

    # ---- cache ---------------------------------------------------------------------------------------
    def _get(self, key: str, build: Any) -> Grammar:
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
        source = build()
        # Check the grammar against the tokenizer now, so a bad schema becomes a 400 at admission instead of
        # a matcher that is in an error state from its first step.
        error = self._llg.LLMatcher.validate_grammar(source, self._tokenizer)
        if error:
            raise ValueError(f"invalid grammar: {error}")
        grammar = Grammar(self, source)
        with self._lock:
            self._cache[key] = grammar
            if len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return grammar


class Grammar:
    """A validated grammar bound to one tokenizer; shareable across requests, each of which gets a Matcher."""

    def __init__(self, compiler: GrammarCompiler, source: str) -> None:
        self._compiler = compiler
        self.source = source

    def matcher(self) -> Matcher:
        return Matcher(self._compiler, self.source)


class Matcher:
    """Per-row parser state: which tokens may come next, and whether the grammar is complete."""

    def __init__(self, compiler: GrammarCompiler, source: str) -> None:
        self._m = compiler._llg.LLMatcher(compiler._tokenizer, source, log_level=0)
        self._check()
        self._vocab_size = compiler.vocab_size
        # One bit per token id, bit (i % 32) of word (i // 32): the layout llguidance writes.
        self._bitmask = torch.zeros((compiler.vocab_size + 31) // 32, dtype=torch.int32)
        self._device_bits: torch.Tensor | None = None

    def _check(self) -> None:
        if self._m.is_error():
            raise RuntimeError(f"grammar matcher error: {self._m.get_error()}")

    def mask_logits(self, logits: torch.Tensor) -> None:
        """In place on a 1-D ``[vocab_size]`` float row: disallowed tokens become -inf. Once the grammar is
        complete only the EOS ids stay allowed, so EOS can never come early and the row always ends cleanly."""
        if logits.dim() != 1 or logits.shape[0] != self._vocab_size:
            raise ValueError(f"expected a [{self._vocab_size}] logits row, got {tuple(logits.shape)}")
        self._check()
        self._m.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
        if logits.device.type == "cpu":
            # numpy's unpackbits is the fastest CPU unpack we measured (faster than xgrammar's C++ kernel).
            bits = np.unpackbits(self._bitmask.numpy().view(np.uint8), bitorder="little", count=self._vocab_size)
            allowed = torch.from_numpy(bits.view(np.bool_))
        else:
            # On an accelerator ship 4 bytes per 32 tokens and unpack there, not a [vocab] bool mask.
            if self._device_bits is None or self._device_bits.device != logits.device:
                self._device_bits = torch.arange(32, dtype=torch.int32, device=logits.device)
            words = self._bitmask.to(logits.device, non_blocking=True)
            allowed = ((words.unsqueeze(-1) >> self._device_bits) & 1).view(-1)[: self._vocab_size].bool()
        logits.masked_fill_(~allowed, float("-inf"))

    def accept(self, token_id: int) -> bool:
        """Advance with the sampled token. False, with the state unchanged, if the grammar does not allow it
        (checked first, because a refused consume would leave llguidance's matcher permanently in error)."""
        if self._m.is_error() or self._m.validate_tokens([token_id]) != 1:
            return False
        return bool(self._m.consume_token(token_id))

    def is_terminated(self) -> bool:
        """True once the grammar is complete and nothing but EOS can follow (or EOS was accepted): the engine
        finishes the row with reason "stop". False in an error state (use accept's result for that)."""
        return bool(self._m.is_stopped()) and not self._m.is_error()

    def is_accepting(self) -> bool:
        """True when the output so far is a complete match (EOS is allowed now), even if more could follow."""
        return bool(self._m.is_accepting())
