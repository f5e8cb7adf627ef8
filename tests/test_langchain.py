"""The chat scenarios through a second, independent client: LangChain's ChatOpenAI (langchain-openai)."""

from __future__ import annotations

import json
from typing import Literal

import pydantic
import pytest

from tests.conftest import Server
from tests.test_chat_e2e import PROMPTS, reference
from tests.test_tools import WEATHER

pytest.importorskip("langchain_openai")
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_openai import ChatOpenAI


def chat(served: Server, **kwargs: object) -> ChatOpenAI:
    return ChatOpenAI(model=served.model, base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0,
                      timeout=60, **kwargs)


def test_invoke_and_stream_are_greedy_exact(served: Server) -> None:
    llm = chat(served, temperature=0, max_tokens=12)
    messages = [SystemMessage("You are a terse assistant."), HumanMessage(PROMPTS[0])]
    expected, prompt_tokens, _ = reference(served.model, [{"role": "system", "content": "You are a terse assistant."},
                                                          {"role": "user", "content": PROMPTS[0]}], 12)
    answer = llm.invoke(messages)
    assert answer.content == expected
    assert answer.usage_metadata is not None and answer.usage_metadata["input_tokens"] == prompt_tokens
    assert "".join(chunk.content for chunk in llm.stream(messages)) == expected


def test_stop_and_n_and_logprobs(served: Server) -> None:
    full, _, _ = reference(served.model, [{"role": "user", "content": PROMPTS[1]}], 30)
    stop = next(full[i:i + 2] for i in range(6, len(full)) if full[i:i + 2].isascii() and full[i:i + 2].strip())
    stopped = chat(served, temperature=0, max_tokens=30, stop=[stop]).invoke(PROMPTS[1])
    assert stopped.content == full[:full.find(stop)]
    result = chat(served, temperature=0, max_tokens=5, n=2, logprobs=True).generate([[HumanMessage(PROMPTS[1])]])
    generations = result.generations[0]
    assert len(generations) == 2 and generations[0].text == generations[1].text
    assert len(generations[0].message.response_metadata["logprobs"]["content"]) == 5


class Verdict(pydantic.BaseModel):
    answer: Literal["yes", "no"]
    score: int = pydantic.Field(ge=0, le=9)


def test_structured_output(served: Server) -> None:
    llm = chat(served, max_tokens=100, seed=3).with_structured_output(Verdict, method="json_schema", strict=True)
    assert isinstance(llm.invoke("Is the sea blue?"), Verdict)


def test_tool_calls_round_trip(served: Server) -> None:
    llm = chat(served, max_tokens=200, seed=2).bind_tools([WEATHER], tool_choice="get_weather",
                                                          parallel_tool_calls=False)
    question = HumanMessage("What is the weather in Oslo?")
    first = llm.invoke([question])
    assert isinstance(first, AIMessage) and len(first.tool_calls) == 1
    call = first.tool_calls[0]
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    follow_up = chat(served, max_tokens=4, temperature=0).bind_tools([WEATHER]).invoke(
        [question, first, ToolMessage(json.dumps({"sky": "clear"}), tool_call_id=call["id"])])
    assert isinstance(follow_up, AIMessage) and follow_up.response_metadata["finish_reason"] == "length"
