"""Reasoning blocks: split from the answer (think tags, opened by the model or by the
prompt), streamed deltas equal to the whole split under every chunking, detection from the
template, and the chat-output layer that reads reasoning first and tool calls after it."""

from __future__ import annotations

import random

import pytest

from rocmforge.server.chat_output import ChatOutput
from rocmforge.server.reasoning import ReasoningFormat, ReasoningStream, reasoning_format
from rocmforge.server.tool_calls.hermes import HermesFormat

THINK = ReasoningFormat()
CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'


@pytest.mark.parametrize("text, inside, reasoning, content", [
    ("plain answer", False, None, "plain answer"),
    ("<think>\nLet me see.\n</think>\n\nIt is 4.", False, "Let me see.", "It is 4."),
    ("  <think>a</think>b", False, "a", "b"),
    ("<think></think>answer", False, "", "answer"),
    ("<think>\nstill thinking when cut off", False, "still thinking when cut off", ""),
    ("a <think>late</think> b", False, None, "a <think>late</think> b"),  # reasoning comes first or not at all
    ("<thi", False, None, "<thi"),
    ("the prompt opened it.\n</think>\n\nAnswer.", True, "the prompt opened it.", "Answer."),
    ("never closed", True, "never closed", ""),
    ("</think>only answer", True, "", "only answer"),
    ("x </thinking> y </think> z", True, "x </thinking> y", "z"),
])
def test_split(text: str, inside: bool, reasoning: str | None, content: str) -> None:
    assert THINK.split(text, inside) == (reasoning, content)


@pytest.mark.parametrize("text, inside", [
    ("plain answer", False), ("<think>\nLet me see.\n</think>\n\nIt is 4.", False), ("  <think>a  \n</think>b", False),
    ("<think>\nstill thinking  ", False), ("<thi", False), ("  ", False), ("x </thinking> y </think>  z ", True),
    ("never closed \n", True), ("</think>", True), ("a</th", True),
])
def test_streamed_deltas_equal_the_whole_split(text: str, inside: bool) -> None:
    reasoning, content = THINK.split(text, inside)
    rng = random.Random(text)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
        stream = ReasoningStream(THINK, inside)
        got_reasoning, got_content = "", ""
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            r, c = stream.feed(text[a:b])
            got_reasoning, got_content = got_reasoning + r, got_content + c
        r, c = stream.finish()
        assert (got_reasoning + r, got_content + c) == (reasoning or "", content)


def test_prompt_left_inside_a_think_block() -> None:
    assert THINK.starts_inside("<|im_start|>assistant\n<think>\n")
    assert not THINK.starts_inside("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not THINK.starts_inside("<|im_start|>assistant\n")
    # a user's own "<think>" is no block the template opened
    assert not THINK.starts_inside("what does <think> mean?<|im_end|>\n<|im_start|>assistant\n")


def test_detected_from_the_template() -> None:
    qwen3 = "{%- if enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    assert reasoning_format("auto", qwen3) == THINK
    assert reasoning_format("auto", "<|im_start|>{{ m }}") is None
    assert reasoning_format("auto", None) is None
    assert reasoning_format("think", None) == THINK
    assert reasoning_format("none", qwen3) is None


def test_tool_calls_are_read_after_the_reasoning() -> None:
    output = ChatOutput(THINK, False, HermesFormat())
    text = f"<think>maybe {CALL} is wrong</think>\nCalling. {CALL}"
    reply = output.parse(text)
    assert reply.reasoning == f"maybe {CALL} is wrong"
    assert reply.content == "Calling." and [(c.name, c.arguments) for c in reply.calls] == [("f", '{"x": 1}')]
    for step in (1, 2, 5, 17):
        stream = output.stream()
        reasoning, content, deltas = "", "", []
        for i in range(0, len(text), step):
            piece = stream.feed(text[i:i + step])
            reasoning, content, deltas = reasoning + piece.reasoning, content + piece.content, deltas + piece.tool_calls
        rest = stream.finish(text)
        reasoning, content, deltas = reasoning + rest.reasoning, content + rest.content, deltas + rest.tool_calls
        assert reasoning == reply.reasoning and content == reply.content
        assert "".join(d["function"].get("arguments", "") for d in deltas) == '{"x": 1}'
        assert [c.id for c in rest.calls] == [d["id"] for d in deltas if "id" in d]


def test_without_formats_the_reply_is_its_text() -> None:
    reply = ChatOutput().parse(f"<think>x</think>{CALL}")
    assert (reply.reasoning, reply.content, reply.calls) == (None, f"<think>x</think>{CALL}", [])


def test_an_empty_reasoning_block_is_none() -> None:
    reply = ChatOutput(THINK).parse("<think>\n\n</think>\n\nThe answer.")
    assert (reply.reasoning, reply.content) == (None, "The answer.")
