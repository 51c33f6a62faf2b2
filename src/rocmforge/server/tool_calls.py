"""Tool calls in the Hermes format (Qwen2.5, Qwen3, Hermes 2/3 and most templates that render
``tools``): the model writes ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
once per call, after any text.

The chat route owns one :class:`ToolCallStream` per choice: it passes content through until
a ``<tool_call>`` marker (holding back a tail that may be the start of one), then keeps the
rest, and at the end parses the calls (:func:`parse_tool_calls`). :func:`tool_call_grammar`
is the Lark grammar that makes ``tool_choice`` ``required`` or a named function binding:
only calls of the allowed functions, with arguments valid against their schemas (objects
closed, as for ``response_format``).
:func:`tools_prompt` describes the tools to a model whose chat template does not render them.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rocmforge.structured.compiler import closed_schema

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
_JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    """One parsed call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tool_calls(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """``(content, calls)`` of a whole output. Content is the text before the first call
    (None when empty). A call whose JSON does not parse, or has no string ``name``, leaves
    the whole output as content (the model did not call a tool after all)."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls = []
    for match in _CALL.finditer(text, start):
        try:
            body = json.loads(match.group(1))
        except ValueError:
            return text, []
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return text, []
        arguments = body.get("arguments", {})
        calls.append(ParsedToolCall(body["name"], json.dumps(arguments, ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}"))
    if not calls:
        return text, []
    content = text[:start].strip()
    return content or None, calls


class ToolCallStream:
    """Streams a choice's content up to its first tool call (module docstring)."""

    def __init__(self) -> None:
        self._held = ""
        self._calling = False
        self._tail = ""

    def feed(self, delta: str) -> str:
        """The part of ``delta`` that is surely content (may be empty)."""
        if self._calling:
            self._tail += delta
            return ""
        text = self._held + delta
        start = text.find(OPEN)
        if start >= 0:
            self._calling, self._held, self._tail = True, "", text[start:]
            return text[:start]
        keep = _marker_prefix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def finish(self, full_text: str) -> tuple[str, list[ParsedToolCall]]:
        """At the end: ``(content not yet sent, calls)``; parsed from the whole output."""
        _, calls = parse_tool_calls(full_text)
        if not calls:
            return self._held + self._tail, []
        return self._held if not self._calling else "", calls


def _marker_prefix(text: str) -> int:
    """Length of the longest end of ``text`` that begins ``<tool_call>``."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0


def tool_call_grammar(tools: Sequence[dict[str, Any]], *, parallel: bool) -> str:
    """Lark grammar: one call (or, with ``parallel``, one or more) of these functions, each
    ``{"name": <its name>, "arguments": <valid against its parameters>}``."""
    schema = {"anyOf": [
        {"type": "object",
         "properties": {"name": {"const": tool["function"]["name"]},
                        "arguments": closed_schema(tool["function"].get("parameters") or {"type": "object"})},
         "required": ["name", "arguments"], "additionalProperties": False}
        for tool in tools
    ], "x-guidance": _JSON_FORMAT}
    repeat = ' ("\\n" call)*' if parallel else ""
    return (f"start: call{repeat}\n"
            f'call: "{OPEN}\\n" body "\\n{CLOSE}"\n'
            f"body: %json {json.dumps(schema, ensure_ascii=False)}\n")


def hermes_history(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Template messages with tool-call history written as Hermes text, for templates that
    know neither ``tool_calls`` nor tool results: an assistant turn's calls follow its
    content as ``<tool_call>`` blocks, and a tool result becomes a user turn holding
    ``<tool_response>`` blocks (consecutive results in one turn), as Qwen's template writes them."""
    out: list[dict[str, Any]] = []
    results_turn = False  # whether out[-1] is a turn of tool results made here
    for message in messages:
        if message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if results_turn:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            results_turn = True
            continue
        results_turn = False
        if message["role"] == "assistant" and message.get("tool_calls"):
            blocks = [OPEN + "\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                               ensure_ascii=False) + "\n" + CLOSE
                      for c in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join([message["content"], *blocks]
                                                                 if message["content"] else blocks)})
        else:
            out.append(message)
    return out


def tools_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """A system-prompt section offering ``tools`` in the Hermes format, for chat templates
    that do not render ``tools`` themselves."""
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            f'{OPEN}{CLOSE} XML tags:\n{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}')
