"""The model's reasoning apart from its answer (`reasoning_content`, as vLLM and SGLang return it), for the model
families whose chat template writes <think>...</think> (Qwen3, DeepSeek-R1). The worker says from the template
where the reasoning is (`Accepted.reasoning`); this splits the text as it streams, holding back only what may
still turn out to be a tag."""

from __future__ import annotations

from common.protocol import THINK_CLOSE, THINK_OPEN, Accepted, ReasoningMode
from common.settings import Settings


def reasoning_mode(settings: Settings, accepted: Accepted) -> ReasoningMode:
    """Where the answer's reasoning is: as the worker read it from the template, unless REASONING_PARSER=none."""
    return accepted.reasoning if settings.reasoning_parser == "auto" else "none"


class ReasoningSplitter:
    """Feed the text of one choice piece by piece; each call returns (reasoning, content) to send now."""

    def __init__(self, mode: ReasoningMode) -> None:
        self.state = {"none": "content", "tagged": "start", "open": "reasoning"}[mode]
        self._held = ""
        self._after_close = False  # the answer's leading newlines after </think> are the template's, not the answer

    def feed(self, text: str) -> tuple[str, str]:
        self._held += text
        reasoning, content = "", ""
        if self.state == "start":
            head = self._held.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, self._held = "reasoning", head[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(head):
                return "", ""  # maybe the tag, still arriving
            else:
                self.state = "content"
        if self.state == "reasoning":
            end = self._held.find(THINK_CLOSE)
            if end < 0:
                keep = _partial_tag(self._held, THINK_CLOSE)
                reasoning, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
                return reasoning, ""
            reasoning, self._held = self._held[:end], self._held[end + len(THINK_CLOSE):]
            self.state, self._after_close = "content", True
        if self._after_close:
            self._held = self._held.lstrip("\n")
            self._after_close = not self._held
        content, self._held = self._held, ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """What is held at the end: reasoning cut short stays reasoning, anything else is content."""
        held, self._held = self._held, ""
        return (held, "") if self.state == "reasoning" else ("", held)


def split(mode: ReasoningMode, text: str) -> tuple[str | None, str]:
    """A whole answer as (reasoning or None, content)."""
    splitter = ReasoningSplitter(mode)
    first, second = splitter.feed(text), splitter.flush()
    return first[0] + second[0] or None, first[1] + second[1]


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
