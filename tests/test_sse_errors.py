"""A failure after a stream has started reaches the client as an OpenAI error frame, not a silent close."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import Server, serving


@pytest.fixture(scope="module")
def impatient(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`axion serve` whose requests time out after 1.5 s."""
    with serving(tiny_model_dir, tmp_path_factory.mktemp("impatient"), MAX_SEQ_LEN="4096",
                 REQUEST_TIMEOUT_S="1.5") as server:
        yield server


def test_mid_stream_timeout_is_an_error_frame(impatient: Server) -> None:
    stream = impatient.client().chat.completions.create(
        model=impatient.model, messages=[{"role": "user", "content": "go on and on"}], max_tokens=4000,
        temperature=0, stream=True, extra_body={"ignore_eos": True})
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk)
    assert len(received) > 1  # the stream had started: a status code could no longer say it
    assert "did not finish within 1.5s" in str(info.value)


def test_non_streaming_timeout_is_504(impatient: Server) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        impatient.client().chat.completions.create(
            model=impatient.model, messages=[{"role": "user", "content": "go on"}], max_tokens=4000,
            extra_body={"ignore_eos": True})
    assert info.value.status_code == 504 and info.value.body["code"] == "timeout"
