"""Structured outputs over HTTP: OpenAI's ``response_format`` (``json_schema``,
``json_object``) and the ``grammar`` / ``regex`` / ``choice`` extensions, on every
generation route, streamed and not; and constraints that do not compile are 400s naming the
field, while the server goes on serving.

The tiny server's model has random weights: what it writes conforms only because the
constraint held.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import openai
import pytest
from live_server import MODEL_NAME, assert_error_shape, metric_values, wait_until_idle
from prometheus_client.parser import text_string_to_metric_families

MESSAGES = [{"role": "user", "content": "Describe a person."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def _json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def _is_person(value: object) -> bool:
    return (isinstance(value, dict) and list(value) == ["name", "age", "tags"]
            and isinstance(value["name"], str) and len(value["name"]) <= 8
            and type(value["age"]) is int and 0 <= value["age"] <= 120
            and isinstance(value["tags"], list) and len(value["tags"]) <= 3
            and all(tag in ("red", "green", "blue") for tag in value["tags"]))


@pytest.fixture(scope="module")
def oai(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", timeout=30.0, max_retries=0) as c:
        yield c


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chat_json_schema(oai: openai.OpenAI, seed: int) -> None:
    response = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=120, temperature=1.0,
                                           seed=seed, response_format=_json_schema(PERSON))
    [choice] = response.choices
    assert choice.finish_reason == "stop", choice.message.content
    assert _is_person(json.loads(choice.message.content or "")), choice.message.content


def test_streamed_chat_json_schema_concatenates_to_the_same_object(oai: openai.OpenAI) -> None:
    kwargs = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 120, "temperature": 0.7, "seed": 5,
              "response_format": _json_schema(PERSON)}
    whole = oai.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(oai.chat.completions.create(**kwargs, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert _is_person(json.loads(streamed))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_chat_json_object_with_several_choices(oai: openai.OpenAI) -> None:
    response = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=80, temperature=1.0,
                                           seed=3, n=3, response_format={"type": "json_object"})
    assert len(response.choices) == 3
    for choice in response.choices:
        content = choice.message.content or ""
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(content), dict), content
        else:
            assert choice.finish_reason == "length" and content.startswith("{"), content


def test_completion_regex_and_choice_extensions(oai: openai.OpenAI) -> None:
    dates = oai.completions.create(model=MODEL_NAME, prompt="Today is", max_tokens=20, temperature=1.0, seed=1,
                                   extra_body={"regex": r"20\d\d-[01]\d-[0-3]\d"})
    assert re.fullmatch(r"20\d\d-[01]\d-[0-3]\d", dates.choices[0].text), dates.choices[0].text
    assert dates.choices[0].finish_reason == "stop"
    picked = oai.completions.create(model=MODEL_NAME, prompt="Pick one:", max_tokens=20, temperature=0,
                                    extra_body={"choice": ["alpha", "beta", "gamma delta"]})
    assert picked.choices[0].text in ("alpha", "beta", "gamma delta")


def test_native_generate_with_a_gbnf_grammar(client: httpx.Client) -> None:
    grammar = 'root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'
    response = client.post("/generate", json={"prompt": "Sum:", "max_tokens": 30, "temperature": 0.9, "seed": 2,
                                              "grammar": grammar})
    assert response.status_code == 200, response.text
    body = response.json()
    if body["finish_reason"] == "stop":
        assert re.fullmatch(r"\([0-9]+(\+[0-9]+)*\)", body["text"]), body
    else:
        assert re.fullmatch(r"\([0-9]+(\+[0-9]+)*", body["text"]), body


def test_native_stream_with_a_lark_grammar(client: httpx.Client) -> None:
    body = {"prompt": "Answer:", "max_tokens": 10, "temperature": 0, "grammar": 'start: "yes" | "no"'}
    with client.stream("POST", "/generate/stream", json=body) as response:
        assert response.status_code == 200
        lines = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                 if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(event.get("delta", "") for event in lines if "delta" in event)
    assert text in ("yes", "no"), lines


BAD = [
    ({"response_format": _json_schema({"type": "integer", "minimum": 5, "maximum": 3})},
     "response_format.json_schema.schema", "minimum (5) is greater than maximum (3)"),
    ({"response_format": _json_schema({"$ref": "#/$defs/nowhere"})},
     "response_format.json_schema.schema", "nowhere"),
    ({"grammar": "root ::= undefined"}, "grammar", "undefined"),
    ({"regex": "(unclosed"}, "regex", "regex"),
    ({"regex": "[0-9]+", "choice": ["a"]}, "choice", "regex and choice both constrain the output"),
    ({"response_format": {"type": "json_object"}, "grammar": 'start: "a"'}, "grammar",
     "response_format and grammar both"),
]


@pytest.mark.parametrize("extra, param, words", BAD, ids=[p for _, p, _ in BAD])
def test_constraints_that_do_not_compile_are_400s_naming_the_field(client: httpx.Client, extra: dict, param: str,
                                                                     words: str) -> None:
    response = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, **extra})
    error = assert_error_shape(response, 400, "invalid_grammar")
    assert error["param"] == param
    assert words in error["message"], error


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"name": "x"}},
    {"type": "text", "json_schema": {"schema": {}}},
    {"type": "yaml"},
])
def test_malformed_response_formats_are_400s(client: httpx.Client, response_format: dict) -> None:
    response = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES,
                                                         "response_format": response_format})
    assert_error_shape(response, 400)


def test_the_server_serves_on_after_bad_constraints(client: httpx.Client, oai: openai.OpenAI) -> None:
    for extra, _, _ in BAD:
        client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, **extra})
    response = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=120, temperature=0,
                                           response_format=_json_schema(PERSON))
    assert _is_person(json.loads(response.choices[0].message.content or ""))
    values = wait_until_idle(client)
    assert values["rocmforge_kv_cache_usage_ratio"] == 0


def test_structured_requests_and_compiles_are_counted(client: httpx.Client) -> None:
    def sample(name: str, labels: dict[str, str]) -> float:
        for family in text_string_to_metric_families(client.get("/metrics").text):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        raise AssertionError(f"{name} {labels} not exported")

    before = metric_values(client)
    regex_before = sample("rocmforge_structured_requests_total", {"kind": "regex"})
    unique = r"[0-9]{3}-unique-metrics-test"
    for _ in range(2):  # one compile, two requests
        response = client.post("/generate", json={"prompt": "x", "max_tokens": 30, "regex": unique})
        assert response.status_code == 200, response.text
    bad = client.post("/generate", json={"prompt": "x", "regex": "(metrics-test"})
    assert bad.status_code == 400
    after = metric_values(client)
    assert sample("rocmforge_structured_requests_total", {"kind": "regex"}) == regex_before + 2
    assert after["rocmforge_grammar_compiles_total"] == before["rocmforge_grammar_compiles_total"] + 2
    assert after["rocmforge_grammar_compile_errors_total"] == before["rocmforge_grammar_compile_errors_total"] + 1
    assert after["rocmforge_grammar_compile_seconds_total"] > before["rocmforge_grammar_compile_seconds_total"]
