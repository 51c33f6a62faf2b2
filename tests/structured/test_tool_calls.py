"""The Hermes tool-call format: parsing whole outputs, streaming content up to the first
call under every chunking, and the grammar that forces calls (compiled by the engine's
compiler on the tiny vocabulary)."""

from __future__ import annotations

import json
import random

import pytest
from whole_output import accepts_whole

from rocmforge.errors import InvalidGrammarError
from rocmforge.server.tool_calls import (
    ToolCallStream,
    hermes_history,
    parse_tool_calls,
    tool_call_grammar,
    tools_prompt,
)
from rocmforge.structured import StructuredOutput
from rocmforge.structured.compiler import GrammarCompiler
from rocmforge.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("text, content, calls", [
    ("plain answer", "plain answer", []),
    (CALL, None, [("get_weather", {"city": "Paris"})]),
    ("Let me look. " + CALL + "\n" + CALL.replace("Paris", "Rome"), "Let me look.",
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
    ('<tool_call>\n{"name": "get_time"}\n</tool_call>', None, [("get_time", {})]),
    ("<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', '<tool_call>\n{"arguments": {}}\n</tool_call>', []),
    ("<tool_call>\n{\"name\": \"x\"", "<tool_call>\n{\"name\": \"x\"", []),  # cut off: no call
])
def test_parse(text: str, content: str | None, calls: list) -> None:
    got_content, got_calls = parse_tool_calls(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("text", [
    "plain answer with a < sign and <tool",
    "Let me look. " + CALL,
    CALL + "\n" + CALL,
    "<tool_call>\n{not json}\n</tool_call> and more",
    "<tool_cal almost",
])
def test_streamed_content_and_calls_equal_the_whole_parse(text: str) -> None:
    content, calls = parse_tool_calls(text)
    rng = random.Random(text)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 8))))
        stream = ToolCallStream()
        sent = "".join(stream.feed(text[a:b]) for a, b in zip([0, *cuts], [*cuts, len(text)]))
        rest, streamed_calls = stream.finish(text)
        if calls:
            assert (sent + rest).strip() == (content or "")
            assert [(c.name, c.arguments) for c in streamed_calls] == [(c.name, c.arguments) for c in calls]
        else:
            assert sent + rest == text and not streamed_calls


def test_forcing_grammar(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    both = tool_call_grammar([WEATHER, TIME], parallel=True)
    one = tool_call_grammar([WEATHER, TIME], parallel=False)
    time_call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert accepts_whole(compiler, tokenizer, StructuredOutput(grammar=both), CALL)
    assert accepts_whole(compiler, tokenizer, StructuredOutput(grammar=both), CALL + "\n" + time_call)
    assert accepts_whole(compiler, tokenizer, StructuredOutput(grammar=one), time_call)
    assert not accepts_whole(compiler, tokenizer, StructuredOutput(grammar=one), CALL + "\n" + time_call)
    assert not accepts_whole(compiler, tokenizer, StructuredOutput(grammar=both), CALL.replace("get_weather", "get_wether"))
    assert not accepts_whole(compiler, tokenizer, StructuredOutput(grammar=both), CALL.replace('"city"', '"town"'))
    assert not accepts_whole(compiler, tokenizer, StructuredOutput(grammar=both), CALL.replace('"Paris"}', '"Paris", "extra": 1}'))
    assert not accepts_whole(compiler, tokenizer, StructuredOutput(grammar=both), "Sure! " + CALL)


def test_a_tool_whose_parameters_cannot_be_satisfied_does_not_compile(compiler: GrammarCompiler) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "integer", "minimum": 2, "maximum": 1}}}
    with pytest.raises(InvalidGrammarError, match="'arguments' is unsatisfiable"):
        compiler.matcher(StructuredOutput(grammar=tool_call_grammar([bad], parallel=True)))


def test_tools_prompt_lists_every_tool() -> None:
    prompt = tools_prompt([WEATHER, TIME])
    assert json.dumps(WEATHER) in prompt and json.dumps(TIME) in prompt and "<tool_call>" in prompt


def test_history_written_out_for_templates_without_tool_support() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call, call]},
        {"role": "tool", "content": "21", "tool_call_id": "c1"},
        {"role": "tool", "content": "22", "tool_call_id": "c1"},
        {"role": "assistant", "content": "Warm."},
    ]
    assert hermes_history(messages) == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": CALL + "\n" + CALL},
        {"role": "user", "content": "<tool_response>\n21\n</tool_response>\n<tool_response>\n22\n</tool_response>"},
        {"role": "assistant", "content": "Warm."},
    ]
    # what the model writes back in that format parses into the same calls
    _, calls = parse_tool_calls(hermes_history(messages)[1]["content"])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})] * 2
