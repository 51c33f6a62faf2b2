"""The issue's agent acceptance on the default model (SmolLM2-135M-Instruct, greedy), through
the official ``openai`` client against a real server: 20 varied prompts each for
``chat.completions.parse`` with Pydantic models, a nested ``json_schema``, a ``regex``, and
forced tool calls (named and ``required``) whose arguments must validate against the tool's
schema. Every answer must validate. The schemas bound their strings and lists, as the API
reference advises for small models: a 135M model decoding greedily repeats itself, and an
unbounded string or list lets it do so until ``max_tokens``; integers are bounded by the
engine itself (JSON's safe integers). Beyond validity, a few answers are checked for sense (the
city of a weather question is the one asked about), and an agent turn round-trips: a forced
call, its result sent back, a text answer."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import openai
import pytest
from live_server import serving
from pydantic import BaseModel, ConfigDict, Field

pytestmark = pytest.mark.slow
MODEL = "smollm2"


Short = Annotated[str, Field(max_length=40)]
Few = Annotated[list[Short], Field(max_length=6)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Weather(Strict):
    city: Short
    unit: Literal["celsius", "fahrenheit"]
    temperature: float


class Sentiment(Strict):
    label: Literal["positive", "negative", "neutral"]
    confidence: float


class Person(Strict):
    name: Short
    age: int
    hobbies: Few


class Recipe(Strict):
    name: Short
    ingredients: Few
    minutes: int


class Book(Strict):
    title: Short
    author: Short
    year: int


class Country(Strict):
    name: Short
    capital: Short
    population: int


class Product(Strict):
    name: Short
    price: float
    in_stock: bool


class Movie(Strict):
    title: Short
    genre: Literal["comedy", "drama", "action", "horror", "documentary"]
    rating: float


PARSE_CASES = [
    (Weather, "What's the weather in Rome?"), (Weather, "Is it cold in Oslo today?"),
    (Weather, "Give me the weather for Tokyo in fahrenheit."),
    (Sentiment, "Classify the sentiment: I love this movie!"), (Sentiment, "Classify: the service was terrible."),
    (Sentiment, "Sentiment of: it is a Tuesday."),
    (Person, "Invent a person who likes sports."), (Person, "Describe a retired teacher."),
    (Recipe, "Give me a recipe for pancakes."), (Recipe, "A quick tomato soup recipe, please."),
    (Book, "Name a famous novel."), (Book, "Tell me about a science fiction book."),
    (Country, "Tell me about France."), (Country, "Describe Japan."), (Country, "What is the capital of Italy?"),
    (Product, "Describe a laptop for sale."), (Product, "A coffee mug in our shop."),
    (Movie, "Recommend a funny movie."), (Movie, "Name a scary film."), (Movie, "Suggest a film about nature."),
]
assert len(PARSE_CASES) == 20

ORDER_SCHEMA = {"type": "object", "properties": {
    "customer": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                                        "email": {"type": "string", "maxLength": 40}},
                 "required": ["name", "email"]},
    "items": {"type": "array", "minItems": 1, "maxItems": 5, "items": {
        "type": "object", "properties": {"product": {"type": "string", "maxLength": 30}, "quantity": {"type": "integer", "minimum": 1}},
        "required": ["product", "quantity"]}},
    "priority": {"enum": ["low", "normal", "high"]}},
    "required": ["customer", "items", "priority"]}
ORDER_PROMPTS = [
    "Anna ordered two apples.", "Create an order for Bob: three books, urgent.", "Order: 1 laptop for Carol.",
    "Dave wants five pencils and a notebook.", "Eve orders a bicycle, no rush.", "Frank: 2 coffees, 1 tea.",
    "Grace needs ten envelopes today.", "Heidi orders a lamp.", "Ivan buys three shirts.", "Judy: one phone case.",
    "Ken orders pizza for four.", "Laura wants a yoga mat.", "Mallory: 6 eggs and milk.", "Niaj orders a guitar.",
    "Olivia: two tickets, high priority.", "Peggy buys a plant.", "Quentin orders paint, low priority.",
    "Rupert wants a watch.", "Sybil: 12 roses.", "Trent orders headphones.",
]
REGEX_CASES = [
    (r"\d{4}-\d{2}-\d{2}", "When did the Berlin wall fall? Answer with a date."),
    (r"\d{4}-\d{2}-\d{2}", "Today's date?"),
    (r"(yes|no)", "Is the sky blue?"), (r"(yes|no)", "Can fish fly?"),
    (r"[A-Z][a-z]{1,12}", "Name a planet."), (r"[A-Z][a-z]{1,12}", "Name a color."),
    (r"\+\d{1,3} \d{3} \d{3} \d{4}", "Write a phone number."),
    (r"[a-z]{1,12}@[a-z]{1,12}\.(com|org)", "Write an email address."),
    (r"[a-z]{1,12}@[a-z]{1,12}\.(com|org)", "Contact email?"),
    (r"\d{1,3}", "How many legs does a spider have?"), (r"\d{1,3}", "What is 12 times 3?"),
    (r"(red|green|blue)", "Color of grass?"), (r"(red|green|blue)", "Color of the sea?"),
    (r"#[0-9a-f]{6}", "Give a hex color."), (r"\d{2}:\d{2}", "What time is lunch?"),
    (r"[A-Z]{3}", "Airport code of London Heathrow?"), (r"(true|false)", "Is water wet?"),
    (r"[A-Z][a-z]{1,12}, [A-Z][a-z]{1,12}", "Name a city and its country."),
    (r"v\d+\.\d+\.\d+", "Write a version number."), (r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun)", "First day of the week?"),
]
assert len(ORDER_PROMPTS) == 20 and len(REGEX_CASES) == 20


class WeatherArgs(Strict):
    city: Short
    unit: Literal["celsius", "fahrenheit"]


class SearchArgs(Strict):
    query: Short
    max_results: int


class EmailArgs(Strict):
    to: Short
    subject: Short
    body: Annotated[str, Field(max_length=200)]


TOOLS = {
    "get_weather": (WeatherArgs, "Current weather of a city"),
    "search_web": (SearchArgs, "Search the web"),
    "send_email": (EmailArgs, "Send an email"),
}
TOOL_LIST = [{"type": "function", "function": {"name": name, "description": description,
                                               "parameters": args.model_json_schema()}}
             for name, (args, description) in TOOLS.items()]
TOOL_CASES = [
    ("get_weather", "What is the weather in Paris?"), ("get_weather", "Is it raining in London?"),
    ("get_weather", "Temperature in Cairo in fahrenheit?"), ("search_web", "Find recent news about Mars."),
    ("search_web", "Look up the best pizza recipe."), ("search_web", "Who won the last world cup?"),
    ("send_email", "Email Bob that the meeting moved to 3pm."), ("send_email", "Tell alice@example.com thanks."),
    ("send_email", "Write to my boss that I am sick."), ("get_weather", "Weather in Sydney?"),
    ("required", "What's the weather like in Berlin?"), ("required", "Search for cheap flights to Rome."),
    ("required", "Send an email to carol@example.com about lunch."), ("required", "Is it sunny in Madrid?"),
    ("required", "Find the population of Canada."), ("required", "Email the team the report is done."),
    ("required", "How hot is it in Dubai?"), ("required", "Search for Python tutorials."),
    ("required", "Remind dave@example.com of the party by email."), ("required", "Weather forecast for Lima?"),
]
assert len(TOOL_CASES) == 20


@pytest.fixture(scope="module")
def oai(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    for server in serving(default_gguf, tmp_path_factory.mktemp("agent-eval-log"), "--model-name", MODEL):
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=60.0, max_retries=0) as client:
            yield client


def _user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


@pytest.mark.parametrize("model, prompt", PARSE_CASES, ids=[f"{m.__name__}-{i}" for i, (m, _) in enumerate(PARSE_CASES)])
def test_parse_with_a_pydantic_model(oai: openai.OpenAI, model: type[BaseModel], prompt: str) -> None:
    response = oai.chat.completions.parse(model=MODEL, messages=_user(prompt), response_format=model,
                                          max_tokens=200, temperature=0)
    [choice] = response.choices
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, model)


class Customer(Strict):
    name: Annotated[str, Field(max_length=30)]
    email: Annotated[str, Field(max_length=40)]


class Item(Strict):
    product: Annotated[str, Field(max_length=30)]
    quantity: Annotated[int, Field(ge=1)]


class Order(Strict):
    """ORDER_SCHEMA as a Pydantic model, written apart from it."""

    customer: Customer
    items: Annotated[list[Item], Field(min_length=1, max_length=5)]
    priority: Literal["low", "normal", "high"]


@pytest.mark.parametrize("prompt", ORDER_PROMPTS)
def test_a_nested_json_schema(oai: openai.OpenAI, prompt: str) -> None:
    response = oai.chat.completions.create(
        model=MODEL, messages=_user(prompt), max_tokens=300, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER_SCHEMA,
                                                                "strict": True}})
    [choice] = response.choices
    assert choice.finish_reason == "stop", choice.message.content
    # Validated by an independent reading of ORDER_SCHEMA (strict types, no other keys).
    Order.model_validate_json(choice.message.content, strict=True)


@pytest.mark.parametrize("pattern, prompt", REGEX_CASES)
def test_a_regex(oai: openai.OpenAI, pattern: str, prompt: str) -> None:
    response = oai.chat.completions.create(model=MODEL, messages=_user(prompt), max_tokens=40, temperature=0,
                                           extra_body={"regex": pattern})
    [choice] = response.choices
    assert choice.finish_reason == "stop"
    assert re.fullmatch(pattern, choice.message.content), choice.message.content


@pytest.mark.parametrize("choice, prompt", TOOL_CASES)
def test_forced_tool_calls_validate(oai: openai.OpenAI, choice: str, prompt: str) -> None:
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    response = oai.chat.completions.create(model=MODEL, messages=_user(prompt), tools=TOOL_LIST,
                                           tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=200,
                                           temperature=0)
    [answer] = response.choices
    assert answer.finish_reason == "tool_calls", answer.message.content
    [call] = answer.message.tool_calls
    if choice != "required":
        assert call.function.name == choice
    args_model, _ = TOOLS[call.function.name]
    args_model.model_validate_json(call.function.arguments)


def test_the_parsed_values_make_sense(oai: openai.OpenAI) -> None:
    response = oai.chat.completions.parse(model=MODEL, messages=_user("What's the weather in Rome?"),
                                          response_format=Weather, max_tokens=200, temperature=0)
    assert response.choices[0].message.parsed.city == "Rome"


def test_an_agent_turn_with_a_tool(oai: openai.OpenAI) -> None:
    """Ask, get a forced call, send its result back, get a text answer."""
    tools = [TOOL_LIST[0]]
    messages: list[dict] = _user("What is the weather in Paris?")
    first = oai.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=60, temperature=0)
    [choice] = first.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and "Paris" in call.function.arguments
    messages.append({"role": "assistant", "content": None, "tool_calls": [call.model_dump()]})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "clear"}'})
    second = oai.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=40, temperature=0)
    assert second.choices[0].message.content
