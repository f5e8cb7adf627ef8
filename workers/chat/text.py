"""Incremental detokenization with stop strings and tool-call markers.

Text is released only once it can no longer change: bytes of an unfinished UTF-8 character (decoded as U+FFFD)
and any tail that could still grow into a stop string or a marker are held back. A stop string ends the text
just before it, so the client never sees it, even when it spans several tokens. From a tool-call marker on,
text is held (generation goes on) so the engine can parse the calls at the end.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class TextTracker:
    def __init__(self, tokenizer: Any, stop: list[str], markers: list[str] | None = None,
                 hold_leading_json: bool = False) -> None:
        self._tokenizer = tokenizer
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
        self._text = self._tokenizer.decode(token_ids, skip_special_tokens=True)
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
