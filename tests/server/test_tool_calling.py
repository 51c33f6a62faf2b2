"""Tool calling over ``/v1/chat/completions`` with the ``openai`` client: ``tool_choice``
``required`` and named functions force calls of the offered tools (with arguments valid
against their schemas, even from the tiny random-weight model), streamed and not; ``none``
and ``auto`` leave the text alone when no call is written; bad tool fields are 400s."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from live_server import MODEL_NAME, assert_error_shape

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def oai(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", timeout=30.0, max_retries=0) as c:
        yield c


def _valid(name: str, arguments: dict) -> bool:
    if name == "get_weather":
        return (set(arguments) == {"city", "unit"} and isinstance(arguments["city"], str)
                and len(arguments["city"]) <= 12 and arguments["unit"] in ("c", "f"))
    return name == "get_time" and arguments in ({"zone": "utc"}, {"zone": "cet"})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_choice_forces_a_valid_call(oai: openai.OpenAI, seed: int) -> None:
    response = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=[WEATHER, CLOCK],
                                           tool_choice="required", max_tokens=200, temperature=1.0, seed=seed)
    [choice] = response.choices
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    for call in calls:
        assert call.type == "function"
        assert _valid(call.function.name, json.loads(call.function.arguments)), call


def test_a_named_tool_choice_calls_that_tool_once(oai: openai.OpenAI) -> None:
    response = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=[WEATHER, CLOCK],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           parallel_tool_calls=False, max_tokens=100, temperature=0)
    [choice] = response.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_time" and _valid("get_time", json.loads(call.function.arguments))
    assert choice.message.content is None


def test_streamed_tool_calls_equal_the_whole_answer(oai: openai.OpenAI) -> None:
    kwargs = {"model": MODEL_NAME, "messages": MESSAGES, "tools": [WEATHER], "tool_choice": "required",
              "max_tokens": 100, "temperature": 0.8, "seed": 4}
    whole = oai.chat.completions.create(**kwargs).choices[0]
    chunks = [c for c in oai.chat.completions.create(**kwargs, stream=True) if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    streamed: dict[int, dict] = {}
    for delta in deltas:  # what an OpenAI client does with them
        call = streamed.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
        assert delta.id in (None, call["id"])
        call["name"] += delta.function.name or ""
        call["arguments"] += delta.function.arguments or ""
    assert [(c["name"], c["arguments"]) for _, c in sorted(streamed.items())] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert all(c["id"] for c in streamed.values())
    assert len(deltas) > len(streamed)  # the arguments came in pieces, as the model wrote them
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (whole.message.content or "")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_the_openai_clients_stream_helper_assembles_the_calls(oai: openai.OpenAI) -> None:
    kwargs = {"model": MODEL_NAME, "messages": MESSAGES, "tools": [WEATHER, CLOCK], "tool_choice": "required",
              "max_tokens": 100, "temperature": 0.8, "seed": 5}
    whole = oai.chat.completions.create(**kwargs).choices[0].message
    with oai.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.tool_calls]


def test_without_a_call_the_answer_stays_text(oai: openai.OpenAI) -> None:
    plain = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    for choice in ("none", "auto"):
        response = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=[WEATHER],
                                               tool_choice=choice, max_tokens=12, temperature=0)
        message = response.choices[0].message
        assert message.tool_calls is None and message.content  # the random model writes no call
        assert response.choices[0].finish_reason in ("stop", "length")
    assert plain.choices[0].message.content


@pytest.mark.parametrize("extra, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
    ({"tool_choice": "required"}, None),
    ({"tools": [WEATHER, WEATHER]}, None),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "integer", "minimum": 3,
                                                                             "maximum": 1}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_tool_fields_are_400s(client: httpx.Client, extra: dict, param: str | None) -> None:
    response = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, **extra})
    error = assert_error_shape(response, 400)
    if param is not None:
        assert error["param"] == param, error
