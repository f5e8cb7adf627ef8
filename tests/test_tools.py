"""Tool calls: parsing both formats, and forced calls through the server with the official openai SDK."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Server
from tests.test_chat_e2e import _model
from workers.chat.tools import detect_format, forcing_grammar, parse

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 8},
                                  "unit": {"type": "string", "enum": ["c", "f"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}}}}}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


def test_parse_hermes_calls_after_text() -> None:
    text = 'Let me check. <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n' \
           '<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    content, calls = parse(text, "hermes")
    assert content == "Let me check." and [c.name for c in calls] == ["a", "b"]
    assert json.loads(calls[0].arguments) == {"x": 1} and calls[0].id != calls[1].id


def test_parse_leaves_broken_or_cut_calls_as_text() -> None:
    for text in ('<tool_call>{"name": "a", "argu', "<tool_call>not json</tool_call>", "plain words"):
        assert parse(text, "hermes") == (text, [])


def test_parse_llama3_json_calls() -> None:
    content, calls = parse('<|python_tag|>{"name": "a", "parameters": {"q": "x"}}; {"name": "b", "parameters": {}}',
                           "llama3")
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"q": "x"}), ("b", {})]
    assert parse("I think so.", "llama3") == ("I think so.", [])


def test_format_detection_and_grammar_shapes() -> None:
    assert detect_format("... <tool_call> ...") == "hermes"
    assert detect_format("{{ '<|python_tag|>' }}") == "llama3"
    assert forcing_grammar([WEATHER], "auto", True, "hermes") is None
    grammar = forcing_grammar([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, False,
                              "hermes")
    assert grammar is not None and "get_time" in grammar and "get_weather" not in grammar and "call+" not in grammar
    named = forcing_grammar([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, True, "hermes")
    assert named is not None and "call+" not in named  # a named function is called once, parallel or not
    required = forcing_grammar([WEATHER, TIME], "required", True, "hermes")
    assert required is not None and "call+" in required
    twice = forcing_grammar([WEATHER, {"type": "function", "function": {"name": "get_weather"}}], "required", False,
                            "hermes")
    assert twice is not None and twice.count('"const": "get_weather"') == 2  # either declaration may be called


def _calls(resp) -> list:
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    return choice.message.tool_calls


@pytest.mark.parametrize("seed", range(3))
def test_required_tool_call_parses_and_validates(served: Server, seed: int) -> None:
    resp = served.client().chat.completions.create(model=served.model, messages=ASK, tools=[WEATHER],
                                                   tool_choice="required", seed=seed, max_tokens=200)
    calls = _calls(resp)
    assert resp.choices[0].message.content is None and calls
    for call in calls:
        args = json.loads(call.function.arguments)
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f") and len(args["city"]) <= 8


def test_named_tool_choice_and_no_parallel_calls(served: Server) -> None:
    resp = served.client().chat.completions.create(
        model=served.model, messages=ASK, tools=[WEATHER, TIME], max_tokens=200, seed=4, parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = _calls(resp)
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("utc", "cet")


def test_streamed_tool_calls(served: Server) -> None:
    chunks = list(served.client().chat.completions.create(model=served.model, messages=ASK, tools=[WEATHER],
                                                          tool_choice="required", max_tokens=200, seed=5, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and all(d.function.name == "get_weather" for d in deltas)
    assert [d.index for d in deltas] == list(range(len(deltas)))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    for delta in deltas:
        assert set(json.loads(delta.function.arguments)) == {"city", "unit"}


def test_multi_turn_with_tool_results_uses_the_template(served: Server) -> None:
    first = served.client().chat.completions.create(model=served.model, messages=ASK, tools=[WEATHER],
                                                    tool_choice="required", max_tokens=200, seed=6,
                                                    parallel_tool_calls=False)
    (call,) = _calls(first)
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"}]
    second = served.client().chat.completions.create(model=served.model, messages=history, tools=[WEATHER],
                                                     max_tokens=5, temperature=0)
    _, tok = _model(served.model)
    template_history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"}]
    expected = tok.apply_chat_template(template_history, tools=[WEATHER], add_generation_prompt=True,
                                       return_dict=False)
    assert second.usage is not None and second.usage.prompt_tokens == len(expected)


def test_tool_choice_none_describes_tools_but_never_parses(served: Server) -> None:
    resp = served.client().chat.completions.create(model=served.model, messages=ASK, tools=[WEATHER],
                                                   tool_choice="none", max_tokens=6, temperature=0)
    assert resp.choices[0].finish_reason == "length" and resp.choices[0].message.tool_calls is None
