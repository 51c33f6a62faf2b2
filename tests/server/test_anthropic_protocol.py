"""Anthropic request bodies in-process: the conversation in the chat path's form (written out
by hand here), the tools in OpenAI's function shape, the sampling parameters, and the reading
of tool calls out of the model's output."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from rocmforge.server.anthropic_api import _Blocks, _content
from rocmforge.server.anthropic_protocol import MessagesRequest
from rocmforge.server.chat_output import ChatOutput
from rocmforge.server.reasoning import ReasoningFormat
from rocmforge.server.tool_calls.hermes import HermesFormat
from rocmforge.server.tool_calls.mistral import MistralFormat

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


class _NoControlTokens:
    def token_to_id(self, text: str) -> int | None:
        return None

    def is_special(self, token_id: int) -> bool:
        return False


def test_tool_choice_and_sampling() -> None:
    forced = _request(messages=[{"role": "user", "content": "x"}], tools=[TOOL, {**TOOL, "name": "other"}],
                      tool_choice={"type": "tool", "name": "other", "disable_parallel_tool_use": True},
                      temperature=0.5, top_k=5, stop_sequences=["END"], seed=3)
    assert [t["function"]["name"] for t in forced.forced_tools() or []] == ["other"]
    assert not forced.parallel_tool_use
    grammar = HermesFormat().grammar(forced.forced_tools() or [], forced.parallel_tool_use, _NoControlTokens())
    params = forced.to_sampling_params(tool_grammar=grammar)
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


# --- the reply's content blocks, whole and streamed ----------------------------------------------

CALL = '<tool_call>\n{"name": "lookup", "arguments": {"word": "cat"}}\n</tool_call>'
TOOLS = ChatOutput(tools=HermesFormat())
THINKING_TOOLS = ChatOutput(reasoning=ReasoningFormat(), tools=HermesFormat())


def _streamed(output: ChatOutput, text: str, *, parallel: bool, size: int = 3) -> list[dict]:
    """The content blocks a client assembles from the events of ``text`` fed ``size``
    characters at a time (ids left out)."""
    blocks, choice, events = _Blocks(parallel), output.stream(), []
    for i in range(0, len(text), size):
        events += blocks.events(choice.feed(text[i:i + size]))
    events += [*blocks.events(choice.finish(text)), *blocks.close()]
    content: list[dict] = []
    partial: dict[int, str] = {}
    for event in events:
        data = json.loads(event.split("data: ", 1)[1])
        if data["type"] == "content_block_start":
            assert data["index"] == len(content)
            content.append({k: v for k, v in data["content_block"].items() if k != "id"})
        elif data["type"] == "content_block_delta":
            delta, block = data["delta"], content[data["index"]]
            if delta["type"] == "input_json_delta":
                partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
            else:
                key = "text" if delta["type"] == "text_delta" else "thinking"
                block[key] += delta[key]
        elif data["type"] == "content_block_stop" and data["index"] in partial:
            content[data["index"]]["input"] = json.loads(partial[data["index"]])
    return content


def _whole(output: ChatOutput, text: str, *, parallel: bool) -> list[dict]:
    return [{k: v for k, v in block.items() if k != "id"} for block in _content(output.parse(text), parallel)]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_blocks_streamed_equal_the_whole_reply(size: int) -> None:
    output = "Sure.\n" + CALL + "\n" + CALL.replace("cat", "dog")
    text = {"type": "text", "text": "Sure."}
    cat, dog = ({"type": "tool_use", "name": "lookup", "input": {"word": w}} for w in ("cat", "dog"))
    assert _whole(TOOLS, output, parallel=True) == [text, cat, dog]
    assert _whole(TOOLS, output, parallel=False) == [text, cat]
    assert _streamed(TOOLS, output, parallel=True, size=size) == [text, cat, dog]
    assert _streamed(TOOLS, output, parallel=False, size=size) == [text, cat]
    thought = "<think>Which word?</think>" + CALL
    thinking = {"type": "thinking", "thinking": "Which word?", "signature": ""}
    assert _whole(THINKING_TOOLS, thought, parallel=True) == [thinking, cat]
    assert _streamed(THINKING_TOOLS, thought, parallel=True, size=size) == [thinking, cat]
    assert _streamed(TOOLS, "No call at all <tool", parallel=True, size=size) == [
        {"type": "text", "text": "No call at all <tool"}]


def test_tool_use_ids_are_the_formats_and_unique() -> None:
    """The format's ids (Mistral's templates take back only their nine-character ones)."""
    blocks = _content(TOOLS.parse(CALL + "\n" + CALL), True)
    assert all(b["id"].startswith("call_") for b in blocks) and blocks[0]["id"] != blocks[1]["id"]
    [mistral] = _content(ChatOutput(tools=MistralFormat()).parse('[TOOL_CALLS][{"name": "f", "arguments": {}}]'), True)
    assert len(mistral["id"]) == 9 and mistral["id"].isalnum()


def test_a_call_without_an_input_object_is_text() -> None:
    output = 'Sure.\n<tool_call>\n{"name": "lookup", "arguments": 5}\n</tool_call>'
    assert _whole(TOOLS, output, parallel=True) == [{"type": "text", "text": output}]
    assert _streamed(TOOLS, output, parallel=True) == [{"type": "text", "text": output}]
