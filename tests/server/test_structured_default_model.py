"""Structured outputs the way agent code asks for them: the ``openai`` client's
``chat.completions.parse`` with Pydantic models, against a server on the default model
(SmolLM2-135M-Instruct, greedy). Each answer must parse into the model class, and the
values must be the ones a reader would call sensible (the city of a weather question is the
city asked about)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import openai
import pytest
from live_server import Server, start_server, stop_server
from pydantic import BaseModel

pytestmark = pytest.mark.slow
MODEL = "smollm2"


class Weather(BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"]
    temperature: float


class Sentiment(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    confidence: float


class Address(BaseModel):
    street: str
    city: str


class Employee(BaseModel):
    name: str
    title: str
    address: Address


class Person(BaseModel):
    name: str
    age: int
    hobbies: list[str]


@pytest.fixture(scope="module")
def default_server(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(default_gguf, tmp_path_factory.mktemp("structured-log"), "--model-name", MODEL)
    try:
        yield server
    finally:
        stop_server(server)
    assert server.process.returncode == 0, server.log()


@pytest.fixture(scope="module")
def oai(default_server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="x", timeout=60.0, max_retries=0) as c:
        yield c


def _parse(oai: openai.OpenAI, model: type[BaseModel], prompt: str) -> BaseModel:
    response = oai.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          response_format=model, max_tokens=200, temperature=0)
    [choice] = response.choices
    assert choice.finish_reason == "stop"
    parsed = choice.message.parsed
    assert isinstance(parsed, model)
    return parsed


def test_weather(oai: openai.OpenAI) -> None:
    weather = _parse(oai, Weather, "What's the weather in Rome?")
    assert weather.city == "Rome"


def test_enum_field(oai: openai.OpenAI) -> None:
    # parsing validates the Literal: a label outside the three would fail here
    _parse(oai, Sentiment, "Classify the sentiment: I love this movie!")


def test_nested_object(oai: openai.OpenAI) -> None:
    employee = _parse(oai, Employee, "Invent an employee of a bank.")
    assert employee.name and employee.address.street and employee.address.city


def test_list_field(oai: openai.OpenAI) -> None:
    person = _parse(oai, Person, "Invent a person who likes sports.")
    assert 0 < person.age < 120 and person.hobbies


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_an_agent_turn_with_a_tool(oai: openai.OpenAI) -> None:
    """Ask, get a forced call, send its result back, get a text answer."""
    messages: list[dict] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=60, temperature=0)
    [choice] = first.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert "Paris" in call.function.arguments
    messages.append({"role": "assistant", "content": None, "tool_calls": [call.model_dump()]})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "clear"}'})
    second = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=40,
                                         temperature=0)
    assert second.choices[0].message.content
