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


def test_the_fast_decoder_gives_what_decode_gives(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """The Rust tokenizer's own decode where it gives transformers' text (the tests' trained BPE tokenizer,
    all-MiniLM-L6-v2's WordPiece one); `decode` where transformers would clean the text up afterwards."""
    import random

    from transformers import AutoTokenizer

    from devtools.embed_models import minilm_dir
    from workers.chat.text import fast_decoder

    rng = random.Random(0)
    minilm = AutoTokenizer.from_pretrained(minilm_dir())
    cleaned = AutoTokenizer.from_pretrained(minilm_dir())
    cleaned.clean_up_tokenization_spaces = True
    for tok, fast in ((AutoTokenizer.from_pretrained(tiny_model_dir), True), (minilm, True), (cleaned, False)):
        decode = fast_decoder(tok)
        assert (decode.func == tok._tokenizer.decode) is fast, tok
        specials = list(tok.all_special_ids)
        words = tok.encode("Hello , world ! It ' s a test . Isn ' t it ?", add_special_tokens=False)
        for n in (0, 1, 5, 40):
            ids = [rng.choice(specials) if rng.random() < 0.2 else rng.randrange(len(tok)) for _ in range(n)]
            assert decode(ids) == tok.decode(ids, skip_special_tokens=True), (tok, ids)
        assert decode(words) == tok.decode(words, skip_special_tokens=True)


def test_incremental_decoding_gives_the_whole_decode_at_every_token(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """Only the last few tokens are decoded per step; the text must still be what decoding every id gives, on
    random ids (split UTF-8 characters, special tokens) and on real text, byte-level BPE and WordPiece alike."""
    import random

    from transformers import AutoTokenizer

    from devtools.embed_models import minilm_dir
    from workers.chat.text import IncrementalDecoder

    rng = random.Random(1)
    sentence = "Héllo, wörld! Ünïcode 日本語 and emoji 🙂🙂 — it's playing ##ing ok. " * 3
    for tok in (AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(minilm_dir())):
        specials = list(tok.all_special_ids)
        streams = [tok.encode(sentence, add_special_tokens=False)]
        streams += [[rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(tok)) for _ in range(120)]
                    for _ in range(5)]
        for ids in streams:
            decoder = IncrementalDecoder(tok)
            assert decoder._incremental
            for n in range(len(ids) + 1):
                assert decoder(ids[:n]) == tok.decode(ids[:n], skip_special_tokens=True), (tok, ids[:n])
