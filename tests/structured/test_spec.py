"""StructuredOutput: one constraint, validated as data, before anything compiles it."""

from __future__ import annotations

import json

import pytest

from rocmforge.errors import InvalidGrammarError, InvalidRequestError
from rocmforge.sampling_params import SamplingParams
from rocmforge.structured import StructuredOutput
from rocmforge.structured.spec import MAX_SPEC_BYTES


def test_schema_as_dict_or_text_is_one_constraint_with_its_key_order() -> None:
    schema = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "string"}}}
    from_dict = StructuredOutput(json=schema)
    from_text = StructuredOutput(json=json.dumps(schema, indent=2))
    assert from_dict == from_text and hash(from_dict) == hash(from_text)
    assert from_dict.kind == "json"
    assert list(json.loads(from_dict.source)["properties"]) == ["z", "a"]


@pytest.mark.parametrize("spec, kind, source", [
    (StructuredOutput(json_object=True), "json_object", '{"type": "object"}'),
    (StructuredOutput(regex=r"\d+"), "regex", r"\d+"),
    (StructuredOutput(choice=["yes", "no"]), "choice", '["yes", "no"]'),
    (StructuredOutput(grammar="start: /a+/"), "grammar", "start: /a+/"),
    (StructuredOutput(json=True), "json", "{}"),
    (StructuredOutput(json=False), "json", '{"not":{}}'),
])
def test_kind_and_source(spec: StructuredOutput, kind: str, source: str) -> None:
    assert spec.kind == kind
    assert spec.source == source


@pytest.mark.parametrize("kwargs, param, words", [
    ({}, None, "got none"),
    ({"regex": "a", "choice": ["a"]}, "choice", "regex and choice"),
    ({"json_object": True, "grammar": "start: /a/"}, "json_object", "grammar and json_object"),
    ({"json": "{not json"}, "json", "not valid JSON"),
    ({"json": "[1, 2]"}, "json", "is an object, got list"),
    ({"json": {"type": "number", "maximum": float("nan")}}, "json", "cannot be written as JSON"),
    ({"json": "[" * 100_000 + "]" * 100_000}, "json", "nested too deeply"),
    ({"choice": "yes"}, "choice", "list of strings"),
    ({"choice": []}, "choice", "non-empty list"),
    ({"choice": ["a", ""]}, "choice", "non-empty strings"),
    ({"choice": ["a", 3]}, "choice", "non-empty strings"),
    ({"regex": "  "}, "regex", "non-empty string"),
    ({"grammar": 7}, "grammar", "non-empty string"),
    ({"regex": "a" * (MAX_SPEC_BYTES + 1)}, "regex", f"longer than {MAX_SPEC_BYTES} bytes"),
])
def test_invalid_constraints_are_typed_errors_naming_the_field(kwargs: dict, param: str | None, words: str) -> None:
    with pytest.raises(InvalidGrammarError) as info:
        StructuredOutput(**kwargs)
    assert info.value.param == param
    assert words in info.value.message
    assert info.value.code == "invalid_grammar"


def test_deeply_nested_schema_object_is_refused_not_a_crash() -> None:
    schema: dict = {}
    for _ in range(5000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(InvalidGrammarError, match="nested too deeply"):
        StructuredOutput(json=schema)


def test_sampling_params_take_only_a_structured_output() -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(structured={"regex": "a"})  # type: ignore[arg-type]
    assert info.value.param == "structured"
    assert SamplingParams(structured=StructuredOutput(regex="a")).structured == StructuredOutput(regex="a")
