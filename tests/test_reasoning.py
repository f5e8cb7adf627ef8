"""Reasoning apart from the answer (`reasoning_content`) for templates that write <think>: the splitter on its own,
the worker's reading of the template, and the official SDK against a served model whose template thinks."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from api.reasoning import ReasoningSplitter, split
from common.protocol import ChatJob, ChatMessage, SamplingParams
from tests.conftest import Server, serving
from workers.chat.external.client import Piece
from workers.chat.external.relay import Choice as RelayChoice
from workers.chat.sequence import reasoning_mode

#: Qwen3's way: the model opens <think> itself; `enable_thinking: false` writes an empty block into the prompt.
THINKS = ("{%- if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
          "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}")
#: DeepSeek-R1's way: the prompt ends inside <think>.
OPENS = "{%- if add_generation_prompt %}{{- '<think>\\n' }}{%- endif %}"


def _feed(mode: str, pieces: list[str]) -> tuple[str, str]:
    splitter, reasoning, content = ReasoningSplitter(mode), "", ""  # type: ignore[arg-type]
    for piece in [*pieces, None]:
        r, c = splitter.feed(piece) if piece is not None else splitter.flush()
        reasoning, content = reasoning + r, content + c
    return reasoning, content


def test_the_splitter_holds_only_what_may_be_a_tag() -> None:
    text = "<think>\nlet me see</think>\n\nThe answer."
    for cut in range(len(text) + 1):  # every place a piece may end
        assert _feed("tagged", [text[:cut], text[cut:]]) == ("\nlet me see", "The answer."), cut
    assert _feed("tagged", list(text)) == ("\nlet me see", "The answer.")
    assert split("open", "hmm</think>ok") == ("hmm", "ok") and split("open", "cut short") == ("cut short", "")
    assert split("tagged", "plain <think> later") == (None, "plain <think> later")
    assert split("none", "<think>x</think>y") == (None, "<think>x</think>y")


def _with_template(source: Path, target: Path, extra: str) -> Path:
    shutil.copytree(source, target)
    template = target / "chat_template.jinja"
    template.write_text(template.read_text() + extra)
    return target


def test_the_worker_reads_the_mode_from_the_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = ChatJob(request_id="r", model="m", messages=[ChatMessage("user", "hi")], params=SamplingParams(),
                  created=0.0)
    for extra, mode in (("", "none"), (THINKS, "tagged"), (OPENS, "open")):
        folder = _with_template(tiny_model_dir, tmp_path / mode, extra)
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                      return_dict=False)
        assert reasoning_mode(job, tok, ids) == mode


def serving_with_template(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                          extra: str) -> Iterator[Server]:
    """`axion serve` of the tiny model with `extra` appended to its chat template."""
    folder = _with_template(tiny_model_dir, tmp_path_factory.mktemp("template") / "model", extra)
    with serving(folder, tmp_path_factory.mktemp("template-logs"), MAX_SEQ_LEN="512") as server:
        yield server


@pytest.fixture(scope="module")
def thinking(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serving_with_template(tiny_model_dir, tmp_path_factory, THINKS)


def test_reasoning_content_through_the_sdk(thinking: Server) -> None:
    """The output is forced into a thinking shape (the weights are random); the server must split it."""
    client, ask = thinking.client(), [{"role": "user", "content": "Think first."}]
    shape = {"guided_regex": "<think>[a-z]{3}</think>[a-z]{2}"}
    whole = client.chat.completions.create(model=thinking.model, messages=ask, max_tokens=40, seed=1,  # type: ignore[arg-type]
                                           extra_body=shape)
    message = whole.choices[0].message
    reasoning = getattr(message, "reasoning_content", None)
    assert reasoning is not None and len(reasoning) == 3 and len(message.content or "") == 2
    chunks = list(client.chat.completions.create(model=thinking.model, messages=ask, max_tokens=40, seed=1,  # type: ignore[arg-type]
                                                 extra_body=shape, stream=True))
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (streamed, content) == (reasoning, message.content)
    plain = client.chat.completions.create(model=thinking.model, messages=ask, max_tokens=10, seed=1,  # type: ignore[arg-type]
                                           extra_body={"guided_regex": "[a-z]{4}",
                                                       "chat_template_kwargs": {"enable_thinking": False}})
    assert getattr(plain.choices[0].message, "reasoning_content", None) is None
    assert len(plain.choices[0].message.content or "") == 4


def test_reasoning_an_external_engine_sends_apart_is_put_back_for_the_splitter() -> None:
    """vLLM serving with a reasoning parser streams `reasoning_content` beside `content`: the relay writes it back
    between the tags the template's mode expects, so the API splits it as it does the native engine's."""
    for mode, opened in (("tagged", "<think>"), ("open", "")):
        choice = RelayChoice(0, reasoning=mode)  # type: ignore[arg-type]
        deltas = [choice.add(Piece(0, reasoning="ab")), choice.add(Piece(0, reasoning="cd")),
                  choice.add(Piece(0, text="Hi"))]
        text = "".join(d.text for d in deltas if d is not None)
        assert text == opened + "abcd</think>Hi"
        assert [d.seq for d in deltas if d is not None] == [len(opened) + 1, len(opened) + 3, len(text) - 1]
        assert split(mode, text) == ("abcd", "Hi")  # type: ignore[arg-type]
