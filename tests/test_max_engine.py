"""The real Modular MAX (`max serve`, installed into .venv-max by scripts/install_max.sh) as the chat engine of
`axion serve`, on the session's tiny Llama, on CPU, offline.

One MAX engine serves the whole module: its first start compiles the model for minutes (its compile cache is
kept in ~/.cache/axion/max-tests, or AXION_MAX_CACHE, so later runs start in about half a minute). The restart
test pays one warm start more.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import REPO, Server
from tests.engine_helpers import (
    chat_worker_info,
    engine_tree,
    guards,
    kill_9_worker_and_check_nothing_left,
    start_front,
    wait_backend,
)

MAX_BIN = REPO / ".venv-max/bin/max"
# MAX's compile cache outlives the checkout, as pip's cache does, so a fresh clone on a machine that ran the tests
# before starts MAX in half a minute instead of compiling for minutes; AXION_MAX_CACHE picks another folder.
MAX_CACHE = os.environ.get("AXION_MAX_CACHE") or str(Path.home() / ".cache" / "axion" / "max-tests")
MESSAGES = [{"role": "user", "content": "Write one line about the sea."}]
START_TIMEOUT_S = 600

# `make test` installs MAX; only a machine that opted out (AXION_SKIP_MAX=1, as scripts/install_max.sh reads it)
# skips these tests, so a broken install fails them instead of hiding them.
pytestmark = pytest.mark.skipif(bool(os.environ.get("AXION_SKIP_MAX")), reason="AXION_SKIP_MAX is set")


@pytest.fixture(scope="module")
def max_front(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`axion serve` with BACKEND=max and the default EXTERNAL_ENGINE_CMD: MAX, found in .venv-max."""
    started = time.monotonic()
    front = start_front(tiny_model_dir, tmp_path_factory.mktemp("max"), "front", timeout=START_TIMEOUT_S + 60,
                        EXTERNAL_ENGINE_START_TIMEOUT_S=str(START_TIMEOUT_S), XDG_CACHE_HOME=MAX_CACHE, BACKEND="max")
    print(f"MAX front ready in {time.monotonic() - started:.1f}s")
    yield front
    front.procs[0].stop()


def greedy(server: Server, max_tokens: int = 24, **extra: object) -> openai.types.chat.ChatCompletion:
    return server.client().chat.completions.create(model=server.model, messages=MESSAGES, temperature=0,
                                                   max_tokens=max_tokens, **extra)


def max_main(front: Server):
    """The `max serve` process: the guard's child (its model worker is a grandchild of the guard)."""
    guard = guards(front.procs[0].process.pid)[0]
    return next(p for p in guard.children() if "serve" in p.cmdline())


def test_backend_max_spawns_max_and_its_greedy_text_equals_native(max_front: Server, served: Server) -> None:
    info = chat_worker_info(max_front)
    assert info["backend"] == "external", info
    assert info["backend_reason"].startswith("BACKEND=max: architecture LlamaForCausalLM is supported by MAX")
    assert "max" in " ".join(max_main(max_front).cmdline())
    ours, native = greedy(max_front), greedy(served)
    assert ours.choices[0].message.content == native.choices[0].message.content != ""
    assert ours.usage is not None and native.usage is not None
    assert (ours.usage.prompt_tokens, ours.usage.completion_tokens) == (native.usage.prompt_tokens, 24)
    chunks = list(max_front.client().chat.completions.create(
        model=max_front.model, messages=MESSAGES, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ours.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 24


def test_what_max_lacks_is_refused_with_a_400(max_front: Server) -> None:
    with pytest.raises(openai.BadRequestError) as err:  # MAX would silently answer one choice
        greedy(max_front, 4, n=2)
    assert err.value.body["param"] == "n" and err.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as err:  # MAX on CPU refuses it
        greedy(max_front, 4, response_format={"type": "json_object"})
    assert err.value.body["param"] == "response_format"


def test_max_killed_mid_request_is_restarted(max_front: Server, served: Server) -> None:
    main = max_main(max_front)
    stream = max_front.client().chat.completions.create(model=max_front.model, messages=MESSAGES, temperature=0,
                                                        max_tokens=900, stream=True)
    with pytest.raises(openai.APIError) as err:
        for n, _chunk in enumerate(stream):
            if n == 2:
                main.send_signal(signal.SIGKILL)
    assert "engine" in str(err.value)
    started = time.monotonic()
    wait_backend(max_front, "1 restarts", timeout=30)
    wait_backend(max_front, "engine ready", timeout=START_TIMEOUT_S)
    print(f"MAX restarted in {time.monotonic() - started:.1f}s")
    assert greedy(max_front).choices[0].message.content == greedy(served).choices[0].message.content


def test_kill_9_of_the_worker_leaves_no_max_process(max_front: Server) -> None:
    front = max_front.procs[0].process.pid
    tree = engine_tree(front)
    assert len(tree) >= 2, tree  # `max serve` and its model worker, at least
    kill_9_worker_and_check_nothing_left(front, tree)
