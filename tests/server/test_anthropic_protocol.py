"""Anthropic request bodies in-process: the conversation in the chat path's form (written out
by hand here), the tools in OpenAI's function shape, and the sampling parameters."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

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
