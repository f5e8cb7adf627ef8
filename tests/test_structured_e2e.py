"""Structured output: response_format json_object / json_schema, enforced by grammar-constrained decoding."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import openai
import pydantic
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.protocol import ChatJob, ChatMessage, Finished, GuidedDecoding, SamplingParams
from tests.conftest import Server
from workers.chat.engine import ChatEngine


class Verdict(pydantic.BaseModel):
    answer: Literal["yes", "no", "maybe"]
    confidence: int = pydantic.Field(ge=0, le=99)
    urgent: bool
    tag: str = pydantic.Field(max_length=6)


SCHEMA = {**Verdict.model_json_schema(), "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> ChatEngine:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return ChatEngine(model, AutoTokenizer.from_pretrained(tiny_model_dir), torch.device("cpu"), 4096)


def generate(engine: ChatEngine, guided: GuidedDecoding, seed: int, temperature: float = 1.0) -> Finished | str:
    job = ChatJob(request_id=f"r{seed}", model="m", messages=[ChatMessage("user", "Judge this.")], created=0.0,
                  params=SamplingParams(temperature=temperature, seed=seed, max_tokens=120, guided=guided))
    seq = engine.prepare(job)
    engine.add(seq)  # type: ignore[arg-type]
    text, last = "", None
    while engine.active:
        for owner, event in engine.step():
            if owner.request_id == job.request_id:
                text += getattr(event, "text", "")
                last = event
    assert isinstance(last, Finished), last
    return text if last.finish_reason == "stop" else last


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_output_always_validates(engine: ChatEngine, seed: int) -> None:
    text = generate(engine, GuidedDecoding("json_schema", SCHEMA, strict=True), seed)
    assert isinstance(text, str), f"cut at max_tokens: {text}"
    Verdict.model_validate_json(text)
    assert set(json.loads(text)) == {"answer", "confidence", "urgent", "tag"}


@pytest.mark.parametrize("seed", range(4))
def test_json_object_output_is_an_object(engine: ChatEngine, seed: int) -> None:
    result = generate(engine, GuidedDecoding("json_object"), seed)
    if isinstance(result, str):
        assert isinstance(json.loads(result), dict)
    else:  # an open object may run to max_tokens: then it is cut, and says so
        assert result.finish_reason == "length"


def test_greedy_constrained_rows_share_a_batch_with_free_rows(engine: ChatEngine) -> None:
    free = ChatJob(request_id="free", model="m", messages=[ChatMessage("user", "hi")], created=0.0,
                   params=SamplingParams(temperature=0.0, max_tokens=20))
    seq = engine.prepare(free)
    engine.add(seq)  # type: ignore[arg-type]
    text = generate(engine, GuidedDecoding("json_schema", SCHEMA, strict=True), 0, temperature=0.0)
    assert isinstance(text, str)
    Verdict.model_validate_json(text)
    assert len(seq.output_ids) == 20  # type: ignore[union-attr]


def test_sdk_parse_with_a_pydantic_model(served: Server) -> None:
    for seed in range(3):
        completion = served.client().chat.completions.parse(
            model=served.model, messages=[{"role": "user", "content": "Judge this."}], response_format=Verdict,
            seed=seed, max_tokens=120)
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, Verdict) and completion.choices[0].finish_reason == "stop"


def test_sdk_json_object_and_streamed_schema(served: Server) -> None:
    resp = served.client().chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "JSON please"}], max_tokens=200, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA, "strict": True}},
        stream=True)
    Verdict.model_validate_json("".join(c.choices[0].delta.content or "" for c in resp if c.choices))
    obj = served.client().chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "JSON please"}], max_tokens=200, seed=2,
        response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    else:
        assert obj.choices[0].finish_reason == "length"


def _chat(served: Server, seed: int = 0, **extra: object):
    return served.client().chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "Answer."}], max_tokens=60, seed=seed,
        extra_body=extra)


def test_vllm_guided_fields_constrain_the_output(served: Server) -> None:
    """vLLM's `guided_*` fields and `structured_outputs`, as its users send them through `extra_body`."""
    choices = ["positive", "negative", "it's \"mixed\""]
    for seed in range(3):
        assert _chat(served, seed, guided_choice=choices).choices[0].message.content in choices
        text = _chat(served, seed, guided_regex=r"[0-9]{3}-[a-z]{2}").choices[0].message.content or ""
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text), text
        lark = _chat(served, seed, guided_grammar='start: "call " NAME\nNAME: /[a-z]{1,5}/')
        assert re.fullmatch(r"call [a-z]{1,5}", lark.choices[0].message.content or "")
        gbnf = _chat(served, seed, guided_grammar='root ::= "yes" | "no"').choices[0].message.content
        assert gbnf in ("yes", "no")
        so = _chat(served, seed, structured_outputs={"choice": ["left", "right"]}).choices[0].message.content
        assert so in ("left", "right")
    legacy = served.client().completions.create(model=served.model, prompt="Code:", max_tokens=20, seed=1,
                                                extra_body={"guided_regex": "[A-Z]{4}"})
    assert re.fullmatch("[A-Z]{4}", legacy.choices[0].text)


def test_guided_json_and_the_whitespace_switch(served: Server) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 99}, "b": {"enum": ["x y", "z"]}},
              "required": ["a", "b"], "additionalProperties": False}
    for seed in range(3):
        resp = _chat(served, seed, guided_json=schema)
        if resp.choices[0].finish_reason == "stop":
            assert set(json.loads(resp.choices[0].message.content or "")) == {"a", "b"}
        tight = _chat(served, seed, structured_outputs={"json": schema, "disable_any_whitespace": True})
        text = tight.choices[0].message.content or ""
        assert tight.choices[0].finish_reason == "stop" and set(json.loads(text)) == {"a", "b"}
        assert not re.search(r"\s", text.replace('"x y"', "")), text  # no whitespace outside the string value


@pytest.mark.parametrize(("extra", "param"), [
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "start: UNDEFINED_RULE"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "not json"}, "guided_json"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
])
def test_malformed_or_conflicting_constraints_are_400s_naming_the_field(served: Server, extra: dict,
                                                                        param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(served, **extra)
    assert caught.value.body["param"] == param, caught.value.body  # type: ignore[index]
