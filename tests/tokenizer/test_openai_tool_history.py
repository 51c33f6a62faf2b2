"""Tool-call history as OpenAI clients send it (arguments as JSON text, ``content`` null on a
calls-only turn, ``tool_call_id`` on the answers) renders through a real tool-using template
exactly as HF transformers renders the same conversation in its own convention (arguments as
objects)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from real_templates import QWEN25, TOOLS
from test_real_templates import BOS, EOS, _hf_render

from rocmforge.server.protocol import ChatCompletionRequest
from rocmforge.tokenizer import ChatTemplate

WIRE = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 25}'},
    {"role": "assistant", "content": "Paris 21, Rome 25."},
    {"role": "user", "content": "Thanks"},
]


def _hf_convention(messages: list[dict]) -> list[dict]:
    out = []
    for message in messages:
        message = dict(message)
        if "tool_calls" in message:
            message["tool_calls"] = [{**call, "function": {**call["function"],
                                                           "arguments": json.loads(call["function"]["arguments"])}}
                                     for call in message["tool_calls"]]
        out.append(message)
    return out


def test_wire_history_renders_like_transformers() -> None:
    request = ChatCompletionRequest(messages=WIRE)
    ours = ChatTemplate(QWEN25, bos_token=BOS, eos_token=EOS).render(
        [m.template_message() for m in request.messages], tools=TOOLS)
    assert ours == _hf_render(QWEN25, _hf_convention(WIRE), tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' in ours
    assert "<tool_response>\n{\"temp\": 25}\n</tool_response>" in ours


@pytest.mark.parametrize("message, where", [
    ({"role": "user", "content": "x", "tool_calls": WIRE[1]["tool_calls"]}, "only an assistant message"),
    ({"role": "assistant", "content": "x", "tool_call_id": "call_1"}, "only a tool message"),
    ({"role": "user"}, "required"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{not json"}}]},
     "must be JSON text"),
    ({"role": "assistant", "tool_calls": []}, "at least 1 item"),
])
def test_malformed_tool_messages_are_refused(message: dict, where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        ChatCompletionRequest(messages=[message])
