"""Fuzzing over HTTP against `axion serve` on the tiny model: no input gets a 5xx or a stack trace, and every
4xx carries OpenAI's error envelope.

- schemathesis generates requests for every operation of the app's own OpenAPI document (/schema/openapi.json,
  which describes the real request bodies), both schema-valid (positive) and schema-violating (negative);
- hypothesis generates valid generation requests with random sampling parameters (these reach the worker,
  where a bad parameter combination would surface as a 500), and raw bodies that are not JSON at all.

Generation is kept cheap: at most 4 new tokens and 2 choices per request. Each test prints its case count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.conftest import REPO, Server

SCHEMA_EXAMPLES = 40  # per operation and mode: 10 POST operations x 2 modes x 40, plus the GETs
GENERATION_EXAMPLES = 150
RAW_EXAMPLES = 100
MIN_CASES = 1000
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), phases=[Phase.generate])
BAD_STREAM_TYPES = ('"type":"server_error"', '"code":"engine_error"', '"code":"sampling_error"')


def check(status: int, text: str, content_type: str, cut_short: bool = False, method: str = "POST") -> None:
    """The contract of every answer: no 5xx, no stack trace, an OpenAI envelope on every 4xx, no body for HEAD.
    `cut_short`: the client stopped reading the event stream early (schemathesis reads at most 20 events), so its
    end is not there."""
    assert status < 500, text[:500]
    if method == "HEAD":
        assert text == ""
        return
    assert "Traceback" not in text and 'File "' not in text
    if status >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and (error["code"] is None or isinstance(error["code"], str))
        assert error["param"] is None or isinstance(error["param"], str)
    elif content_type.startswith("text/event-stream"):
        assert not any(t in text for t in BAD_STREAM_TYPES), text[-500:]
        assert cut_short or text.rstrip().endswith("data: [DONE]") or '"error"' in text
    elif content_type.startswith("application/json"):
        json.loads(text)


def cheap(body: Any, path: str, model: str, use_real_model: bool) -> None:
    """Bound the work a generated request may ask for (the fuzz must stay fast on 2 cores)."""
    if not isinstance(body, dict):
        return
    if use_real_model:
        body["model"] = model
    for field, most in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2), ("best_of", 2),
                        ("min_tokens", 4)):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > most:
            body[field] = most
    if path in ("/v1/chat/completions", "/v1/completions") and all(
            body.get(field) is None for field in ("max_tokens", "max_completion_tokens")):
        body["max_tokens"] = 4  # absent or null: null asks for tokens up to the context length


def report(capsys: pytest.CaptureFixture[str], what: str, counts: Counter[Any], started: float) -> int:
    total = sum(counts.values())
    with capsys.disabled():
        print(f"\n[fuzz] {what}: {total} cases in {time.monotonic() - started:.1f} s; by status: "
              f"{dict(sorted(Counter(status for *_, status in counts.elements()).items()))}")
    return total


def fuzz_operation(served: Server, op: Any, mode: GenerationMode, counts: Counter[Any]) -> None:
    """SCHEMA_EXAMPLES generated requests for one operation; half of them name the served model."""
    @settings(FUZZ, max_examples=SCHEMA_EXAMPLES)
    @given(case=op.as_strategy(generation_mode=mode), use_real_model=st.booleans())
    def run(case: Any, use_real_model: bool) -> None:
        cheap(case.body, op.path, served.model, use_real_model)
        response = case.call(base_url=served.base_url, timeout=60)
        counts[(op.label, mode.value, response.status_code)] += 1
        content_type = response.headers.get("content-type") or ""
        check(response.status_code, response.text, content_type[0] if isinstance(content_type, list) else content_type,
              getattr(response, "stream_cut_short", False), op.method.upper())

    run()


def test_openapi_schema_fuzz(served: Server, capsys: pytest.CaptureFixture[str]) -> None:
    schema = schemathesis.openapi.from_url(f"{served.base_url}/schema/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                              "/v1/rerank", "/rerank", "/tokenize", "/detokenize", "/v1/models"}
    counts: Counter[tuple[str, str, int]] = Counter()
    started = time.monotonic()
    for op in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:
            try:
                fuzz_operation(served, op, mode, counts)
            except Unsatisfiable:
                # An operation whose only inputs are a path id (POST /v1/batches/{id}/cancel) has no invalid
                # request to generate; every positive case still ran.
                assert mode is GenerationMode.NEGATIVE and not op.body, op.label
    total = report(capsys, f"schemathesis over {len(operations)} operations", counts, started)
    assert total >= MIN_CASES
    served_ok = sum(n for (label, _, status), n in counts.items() if status == 200 and label.startswith("POST"))
    assert served_ok > 0  # some generated requests went all the way through a worker


#: A fixed seed keeps CI's run the same from one commit to the next; other seeds pass too (see the issue notes).
CLI_SEED = "259074917462332293860949122880920944798"


def test_schemathesis_cli_every_check(served: Server) -> None:
    """`st run` as the issue ran it: every check (response schemas, status codes, Allow headers, positive and
    negative data, ...) over every operation, 50 examples each."""
    config = REPO / "schemathesis.toml"
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(config), "run",
         f"{served.base_url}/schema/openapi.json", "-n", "50", "--seed", CLI_SEED, "--request-timeout", "60"],
        capture_output=True, text=True, timeout=600, cwd=REPO)  # the config names its hooks file from here
    assert result.returncode == 0, result.stdout[-6000:]
    summary = result.stdout[result.stdout.find("SUMMARY"):]
    assert " generated, " in summary and " passed" in summary, summary


text = st.text(max_size=30)
unit = st.floats(0, 1, allow_nan=False)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                           "content": st.one_of(text, st.lists(st.fixed_dictionaries(
                               {"type": st.just("text"), "text": text}), min_size=1, max_size=3))}),
    st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": st.just("call_1"), "content": text}))
sampling = {
    "temperature": st.floats(0, 2, allow_nan=False), "top_p": unit, "top_k": st.integers(-1, 600),
    "min_p": unit, "presence_penalty": st.floats(-2, 2, allow_nan=False),
    "frequency_penalty": st.floats(-2, 2, allow_nan=False), "repetition_penalty": st.floats(1e-3, 10),
    "seed": st.integers(-(2**63), 2**63 - 1), "n": st.integers(1, 2), "stream": st.booleans(),
    "stop": st.one_of(text.filter(bool), st.lists(text.filter(bool), max_size=4)),
    "logit_bias": st.dictionaries(st.integers(0, 511).map(str), st.floats(-100, 100, allow_nan=False), max_size=5),
    "stop_token_ids": st.lists(st.integers(0, 511), max_size=5), "min_tokens": st.integers(0, 4),
    "ignore_eos": st.booleans(),
}
chat_requests = st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=3),
                                       "max_tokens": st.integers(1, 4)}, optional={
    **sampling, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]),
})
completion_requests = st.fixed_dictionaries({"prompt": st.one_of(
    text.filter(bool), st.lists(text.filter(bool), min_size=1, max_size=2),
    st.lists(st.integers(0, 511), min_size=1, max_size=8)), "max_tokens": st.integers(1, 4)}, optional={
    **sampling, "echo": st.booleans(), "logprobs": st.integers(0, 5)})


def test_valid_generation_requests_never_fail_on_the_worker(served: Server,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    counts: Counter[tuple[str, int]] = Counter()
    started = time.monotonic()
    with httpx.Client(base_url=served.base_url, timeout=60) as http:
        @settings(FUZZ, max_examples=GENERATION_EXAMPLES)
        @given(request=st.one_of(chat_requests.map(lambda b: ("/v1/chat/completions", b)),
                                 completion_requests.map(lambda b: ("/v1/completions", b))))
        def run(request: tuple[str, dict[str, Any]]) -> None:
            path, body = request
            body["model"] = served.model
            response = http.post(path, json=body)
            counts[(path, response.status_code)] += 1
            check(response.status_code, response.text, response.headers.get("content-type", ""))

        run()
    report(capsys, "valid generation requests (hypothesis)", counts, started)
    assert sum(n for (_, status), n in counts.items() if status == 200) > GENERATION_EXAMPLES // 2


def test_raw_bodies_are_client_errors(served: Server, capsys: pytest.CaptureFixture[str]) -> None:
    counts: Counter[tuple[str, int]] = Counter()
    started = time.monotonic()
    paths = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/tokenize", "/detokenize"]
    with httpx.Client(base_url=served.base_url, timeout=60) as http:
        @settings(FUZZ, max_examples=RAW_EXAMPLES)
        @given(path=st.sampled_from(paths), raw=st.one_of(
            st.binary(max_size=300), st.text(max_size=300).map(str.encode),
            st.integers(1, 3000).map(lambda depth: b'{"model": "m", "messages": ' + b"[" * depth + b"]" * depth
                                     + b"}")))
        def run(path: str, raw: bytes) -> None:
            response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
            counts[(path, response.status_code)] += 1
            assert 400 <= response.status_code < 500
            check(response.status_code, response.text, response.headers.get("content-type", ""))

        run()
    report(capsys, "raw bodies (hypothesis)", counts, started)
