"""Incremental detokenization: stop strings across tokens, held-back partial matches and UTF-8."""

from __future__ import annotations

from workers.chat.text import TextTracker


class CharTokenizer:
    """Each id is one byte; decoding keeps unfinished UTF-8 as U+FFFD like byte-level BPE tokenizers do."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def feed(tracker: TextTracker, text: str) -> list[str]:
    data = list(text.encode())
    return [tracker.update(data[: i + 1]) for i in range(len(data))]


def test_plain_text_streams_through() -> None:
    tracker = TextTracker(CharTokenizer(), [])
    assert "".join(feed(tracker, "hello world")) + tracker.flush() == "hello world"


def test_stop_string_spanning_tokens_is_never_sent() -> None:
    tracker = TextTracker(CharTokenizer(), ["STOP"])
    pieces = feed(tracker, "abc STOP def")
    assert tracker.stopped
    assert "".join(pieces) == "abc "
    assert all("S" not in p for p in pieces)


def test_partial_stop_prefix_is_held_then_released() -> None:
    tracker = TextTracker(CharTokenizer(), ["STOP"])
    pieces = feed(tracker, "a STx")
    assert pieces[-2] == "" and pieces[-1] == "STx"
    assert not tracker.stopped


def test_earliest_of_several_stops_wins() -> None:
    tracker = TextTracker(CharTokenizer(), ["zz", "y"])
    pieces = feed(tracker, "abyzz")
    assert "".join(pieces) == "ab" and tracker.stopped


def test_unfinished_utf8_is_held_back() -> None:
    tracker = TextTracker(CharTokenizer(), [])
    pieces = feed(tracker, "é!")
    assert pieces == ["", "é", "!"]
