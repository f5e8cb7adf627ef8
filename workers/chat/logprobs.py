"""Log probabilities in OpenAI's chat shape, with each token's exact UTF-8 bytes.

Decoding one token alone loses bytes: a byte-level BPE token may hold half a UTF-8 character. So the bytes
come from the vocabulary itself: byte-level tokens map back through GPT-2's byte-to-unicode table,
SentencePiece tokens use `▁` for a space and `<0xNN>` for raw bytes.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from common.protocol import TokenLogprob, TopLogprob


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


class TokenBytes:
    """Token id → (text, bytes), cached; built for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = backend.decoder if backend is not None else None
        self._byte_level = decoder is not None and "ByteLevel" in type(decoder).__name__
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._lookup(token_id)
        return found

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return "", []
        if token_id in self._tokenizer.all_special_ids:
            raw = piece.encode()
        elif self._byte_level:
            table = _byte_decoder()
            raw = bytes(table[ch] for ch in piece) if all(ch in table for ch in piece) else piece.encode()
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            raw = bytes([int(piece[3:5], 16)])
        else:
            raw = piece.replace("▁", " ").encode()
        return raw.decode("utf-8", errors="replace"), list(raw)


def token_logprob(log_probs: torch.Tensor, token_id: int, top: int, names: TokenBytes) -> TokenLogprob:
    """One entry from a [vocab] row of log-softmaxed raw logits."""
    text, raw = names(token_id)
    alternatives: list[TopLogprob] = []
    if top > 0:
        values, ids = torch.topk(log_probs, top)
        for value, alt in zip(values.tolist(), ids.tolist(), strict=True):
            alt_text, alt_raw = names(int(alt))
            alternatives.append(TopLogprob(token=alt_text, logprob=float(value), bytes=alt_raw))
    return TokenLogprob(token=text, logprob=float(log_probs[token_id]), bytes=raw, top_logprobs=alternatives)
