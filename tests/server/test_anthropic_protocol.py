"""Anthropic request bodies in-process: the conversation in the chat path's form (written out
by hand here), the tools in OpenAI's function shape, the sampling parameters, and the reading
of tool calls out of the model's output."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rocmforge.server.anthropic_api import _ToolUseReader
from rocmforge.server.anthropic_protocol import MessagesRequest

TOOL = {"name": "lookup", "description": "Look a word up", "input_schema": {
    "type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}


def _request(**fields: object) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 8, **fields})


def test_a_tool_conversation_in_the_chat_form() -> None:
    body = _request(system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}], messages=[
        {"role": "user", "content": "Define two words."},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Two lookups.", "signature": "sig"},
            {"type": "text", "text": "Looking them up."},
            {"type": "tool_use", "id": "toolu_a", "name": "lookup", "input": {"word": "cat"}},
            {"type": "tool_use", "id": "toolu_b", "name": "lookup", "input": {"word": "dög"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": [{"type": "text", "text": "an animal"}]},
            {"type": "tool_result", "tool_use_id": "toolu_b", "content": "no such word", "is_error": True},
            {"type": "text", "text": "And now?"}]},
    ], tools=[TOOL])
    assert [m.model_dump(exclude_none=True) for m in body.chat_messages()] == [
        {"role": "system", "content": "Be brief.\nBe kind."},
        {"role": "user", "content": "Define two words."},
        {"role": "assistant", "content": "Looking them up.", "tool_calls": [
            {"id": "toolu_a", "type": "function", "function": {"name": "lookup", "arguments": '{"word": "cat"}'}},
            {"id": "toolu_b", "type": "function", "function": {"name": "lookup", "arguments": '{"word": "dög"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_a", "content": "an animal"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": "Error: no such word"},
        {"role": "user", "content": "And now?"},
    ]
    assert body.tool_dicts() == [{"type": "function", "function": {
        "name": "lookup", "description": "Look a word up", "parameters": TOOL["input_schema"]}}]
    assert body.calls_tools and body.forced_tools() is None and body.parallel_tool_use


def test_consecutive_turns_of_a_role_are_one_turn() -> None:
    body = _request(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": [
        {"type": "text", "text": "b"}]}, {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}])
    assert [(m.role, m.content) for m in body.chat_messages()] == [("user", "a\nb"), ("assistant", "c"),
                                                                   ("user", "d")]


def test_tool_choice_and_sampling() -> None:
    forced = _request(messages=[{"role": "user", "content": "x"}], tools=[TOOL, {**TOOL, "name": "other"}],
                      tool_choice={"type": "tool", "name": "other", "disable_parallel_tool_use": True},
                      temperature=0.5, top_k=5, stop_sequences=["END"], seed=3)
    assert [t["function"]["name"] for t in forced.forced_tools() or []] == ["other"]
    assert not forced.parallel_tool_use
    params = forced.to_sampling_params()
    assert (params.max_tokens, params.temperature, params.top_k, params.stop, params.seed) == (8, 0.5, 5, ("END",), 3)
    assert params.structured is not None and params.structured.grammar is not None
    assert '"const": "other"' in params.structured.grammar and '"const": "lookup"' not in params.structured.grammar
    assert '("\\n" call)*' not in params.structured.grammar  # one call only
    none = _request(messages=[{"role": "user", "content": "x"}], tools=[TOOL], tool_choice={"type": "none"})
    assert not none.calls_tools and none.forced_tools() is None and none.to_sampling_params().structured is None
    plain = _request(messages=[{"role": "user", "content": "x"}]).to_sampling_params()
    assert plain.temperature == 1.0 and plain.structured is None  # Anthropic's default temperature


@pytest.mark.parametrize("fields, where", [
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "cannot hold a tool_use block"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
        {"role": "user", "content": "y"}]}, "tool_use ids must be unique"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image content blocks"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {}}]}]}]}, "image content blocks"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "first message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "prefill"),
])
def test_anthropic_rules(fields: dict, where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        _request(**fields)


# --- reading tool calls out of the output --------------------------------------------------------

CALL = '<tool_call>\n{"name": "lookup", "arguments": {"word": "cat"}}\n</tool_call>'


def _streamed(text: str, *, parallel: bool, size: int = 3) -> tuple[str, list[tuple[str, str]]]:
    """``(text, [(name, input JSON)])`` read from ``text`` fed ``size`` characters at a time."""
    reader = _ToolUseReader(parallel=parallel)
    passed = "".join(reader.feed(text[i:i + size]) for i in range(0, len(text), size))
    rest, calls = reader.finish(text)
    return passed + rest, [(c.name, c.input_json) for c in calls]


def test_the_reader_passes_text_and_reads_calls() -> None:
    output = "Sure.\n" + CALL + "\n" + CALL.replace("cat", "dog")
    both = [("lookup", '{"word": "cat"}'), ("lookup", '{"word": "dog"}')]
    assert _streamed(output, parallel=True) == ("Sure.\n", both)
    assert _streamed(output, parallel=False) == ("Sure.\n", both[:1])
    whole_text, whole_calls = _ToolUseReader(parallel=True).read(output)
    assert (whole_text, [(c.name, c.input_json) for c in whole_calls]) == ("Sure.\n", both)
    assert [c.block()["input"] for c in whole_calls] == [{"word": "cat"}, {"word": "dog"}]
    assert all(c.id.startswith("toolu_") for c in whole_calls) and whole_calls[0].id != whole_calls[1].id
    assert _streamed("No call at all <tool", parallel=True) == ("No call at all <tool", [])


def test_a_call_without_an_input_object_is_text() -> None:
    output = 'Sure.\n<tool_call>\n{"name": "lookup", "arguments": 5}\n</tool_call>'
    assert _streamed(output, parallel=True) == (output, [])
    assert _ToolUseReader(parallel=True).read(output)[0] == output
