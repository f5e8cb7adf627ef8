"""Settings come from the environment, typed; a bad value stops the process with one line and status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from common.settings import SettingsError, load_settings


def test_defaults() -> None:
    s = load_settings({})
    assert (s.max_seq_len, s.server_host, s.server_port, s.max_connections, s.cache_capacity) == (
        4096, "0.0.0.0", 3000, 100, 1000)
    assert (s.batch_timeout_ms, s.max_batch_size, s.concurrent_requests, s.redis_url, s.log_level) == (
        50, 8, 10, None, "info")
    assert s.model_id == s.model_name


def test_values_are_parsed_and_served_name_wins() -> None:
    s = load_settings({"MAX_SEQ_LEN": "512", "SERVER_PORT": "8080", "MODEL_NAME": "/models/x",
                       "SERVED_MODEL_NAME": "gpt-local", "REDIS_URL": "redis://r:6379/0", "LOG_LEVEL": "DEBUG"})
    assert (s.max_seq_len, s.server_port, s.model_id, s.redis_url, s.log_level) == (
        512, 8080, "gpt-local", "redis://r:6379/0", "debug")


@pytest.mark.parametrize(("rust_log", "level"), [("axion=debug", "debug"), ("warn", "warning"),
                                                  ("info,axion=error", "error"), ("hyper=trace,axion=warn", "warning")])
def test_rust_log_style(rust_log: str, level: str) -> None:
    assert load_settings({"RUST_LOG": rust_log}).log_level == level


@pytest.mark.parametrize(("name", "value"), [("MAX_SEQ_LEN", "abc"), ("MAX_SEQ_LEN", "0"), ("SERVER_PORT", "70000"),
                                             ("LOG_LEVEL", "loud"), ("MAX_BATCH_SIZE", "-1"), ("DEVICE", "tpu")])
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        load_settings({name: value})


def test_bad_value_exits_2_with_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "axion.cli", "api"], capture_output=True, text=True, timeout=60,
                          env={"MAX_SEQ_LEN": "lots", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "MAX_SEQ_LEN" in lines[0]
