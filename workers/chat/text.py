"""Incremental detokenization with stop strings and tool-call markers.

Text is released only once it can no longer change: bytes of an unfinished UTF-8 character (decoded as U+FFFD)
and any tail that could still grow into a stop string or a marker are held back. A stop string ends the text
just before it, so the client never sees it, even when it spans several tokens. From a tool-call marker on,
text is held (generation goes on) so the engine can parse the calls at the end.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend

REPLACEMENT = "\ufffd"


def fast_decoder(tokenizer: Any) -> partial[str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, straight from the Rust tokenizer where that gives the
    same text: transformers' `decode` first walks every id through `to_py_obj`, most of a token's detokenizing
    time. Any tokenizer that changes decoding (a subclass's own `decode`/`_decode`, a clean-up pass transformers
    would apply) goes through `decode` as before."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if (isinstance(tokenizer, TokenizersBackend) and backend is not None
            and type(tokenizer)._decode is TokenizersBackend._decode
            and type(tokenizer).decode is PreTrainedTokenizerBase.decode and not _cleans_up(tokenizer, backend)):
        return partial(backend.decode, skip_special_tokens=True)
    return partial(tokenizer.decode, skip_special_tokens=True)


class IncrementalDecoder:
    """The text of a growing list of output ids, decoding only the tokens since the last complete character.

    Decoding all of a sequence's ids at every token made detokenizing O(n^2) in its length. As vLLM does, a
    few tokens of context are decoded with the new ones and the context's own text cut off the front, so
    decoders that treat a first token specially (SentencePiece's leading space, WordPiece's "##") give the same
    text as a decode of the whole; the new text is kept only once it does not end in an unfinished UTF-8
    character (U+FFFD). Tokenizers that go through transformers' `decode` (a clean-up pass that looks across
    tokens, their own decoding) are decoded whole every time, as before."""

    def __init__(self, tokenizer: Any) -> None:
        self._decode = fast_decoder(tokenizer)
        self._incremental = self._decode.func != tokenizer.decode
        self._stable = ""
        self._context = ""  # the text of ids[prefix:read]
        self._prefix = self._read = 0

    def __call__(self, ids: list[int]) -> str:
        if not self._incremental:
            return self._decode(ids)
        if len(ids) < self._read:  # not a continuation of what came before: start over
            self._stable, self._context, self._prefix, self._read = "", "", 0, 0
        text = self._decode(ids[self._prefix:])
        new = text[len(self._context):] if text.startswith(self._context) else None
        if new is None:  # the context decodes differently with the new tokens after it: decode the whole
            self._stable, self._context, self._prefix, self._read = "", "", 0, 0
            text = self._decode(ids)
            new = text
        if new and not new.endswith(REPLACEMENT):
            self._stable += new
            self._prefix, self._read = self._read, len(ids)
            self._context = self._decode(ids[self._prefix:])
            return self._stable
        return self._stable + new


def _cleans_up(tokenizer: Any, backend: Any) -> bool:
    """Whether transformers' `_decode` would run `clean_up_tokenization` (it skips it for BPE models)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    return type(backend.model).__name__ != "BPE" or bool(forced)


class TextTracker:
    def __init__(self, tokenizer: Any, stop: list[str], markers: list[str] | None = None,
                 hold_leading_json: bool = False) -> None:
        self._decode = IncrementalDecoder(tokenizer)
        self._stop = [s for s in stop if s]
        self._markers = [m for m in markers or [] if m]
        self._prefixes = self._stop + self._markers
        self._longest = max((len(s) for s in self._prefixes), default=0)
        self._hold_leading_json = hold_leading_json
        self._sent = 0
        self._text = ""
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything decoded so far (up to a stop string, if one was hit)."""
        return self._text

    @property
    def sent(self) -> int:
        return self._sent

    def update(self, token_ids: list[int]) -> str:
        """Feed all output ids so far; return the newly releasable text. Sets `stopped` on a stop string."""
        self._text = self._decode(token_ids)
        if self._stop:
            start = max(0, self._sent - self._longest + 1)
            hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                self._text = self._text[: min(hits)]
                return self._release(min(len(self._text), self._marker_limit()))
        end = len(self._text)
        while end > self._sent and self._text[end - 1] == REPLACEMENT:
            end -= 1
        end -= self._partial_suffix(end)
        return self._release(min(end, self._marker_limit()))

    def flush(self) -> str:
        """At the end of the sequence: everything not yet released."""
        return self._release(len(self._text))

    def _marker_limit(self) -> int:
        if self._hold_leading_json and self._sent == 0 and self._text.lstrip().startswith("{"):
            return 0
        found = [i for i in (self._text.find(m) for m in self._markers) if i >= 0]
        return min(found) if found else len(self._text)

    def _partial_suffix(self, end: int) -> int:
        """Length of the longest tail of text[:end] that is a proper prefix of a stop string or a marker."""
        for k in range(min(self._longest - 1, end - self._sent), 0, -1):
            tail = self._text[end - k : end]
            if any(s.startswith(tail) for s in self._prefixes):
                return k
        return 0

    def _release(self, end: int) -> str:
        if end <= self._sent:
            return ""
        piece = self._text[self._sent : end]
        self._sent = end
        return piece
