"""Tool calls: the formats models write them in, parsing them (whole or streamed), and
forcing them with a grammar.

A server speaks one format (``--tool-call-parser``; ``auto`` reads the chat template:
:func:`detect_tool_format`). The chat-output layer (:mod:`rocmforge.server.chat_output`) owns
one :class:`ToolCallStream` per streamed choice and calls :meth:`ToolFormat.parse` on whole
outputs; ``tool_choice`` ``required`` or
a named function compiles :meth:`ToolFormat.grammar`. For a template that renders neither
tools nor tool-call history, :meth:`ToolFormat.tools_prompt` describes the tools in the system
message and :func:`history` writes earlier calls into the conversation in the format's own
words (and their results as Hermes ``<tool_response>`` blocks, the one convention templates
without tool support have seen most).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rocmforge.server.tool_calls.base import ParsedToolCall, TokenLookup, ToolFormat
from rocmforge.server.tool_calls.hermes import HermesFormat
from rocmforge.server.tool_calls.llama3 import PYTHON_TAG, Llama3JsonFormat
from rocmforge.server.tool_calls.mistral import ARGS, TOOL_CALLS, MistralFormat
from rocmforge.server.tool_calls.stream import ToolCallStream

__all__ = ["ParsedToolCall", "TokenLookup", "ToolCallStream", "ToolFormat", "detect_tool_format",
           "history", "tool_format"]


def tool_format(name: str, template_source: str | None) -> ToolFormat:
    """The format ``name`` selects (``auto``: :func:`detect_tool_format`)."""
    if name not in _FORMATS:
        raise ValueError(f"unknown tool-call parser {name!r}")
    return _FORMATS[name](template_source or "")


def detect_tool_format(template_source: str | None) -> ToolFormat:
    """The format a chat template writes calls in: Mistral's when it writes ``[TOOL_CALLS]``,
    Hermes when it writes ``<tool_call>``, Llama 3's JSON for Llama 3 templates that render
    tools; Hermes otherwise."""
    source = template_source or ""
    if TOOL_CALLS in source:
        return MistralFormat(args_marker=ARGS in source)
    if "<tool_call>" in source:
        return HermesFormat()
    if "<|start_header_id|>" in source and "tools" in source and (PYTHON_TAG in source or '"parameters"' in source):
        return Llama3JsonFormat()
    return HermesFormat()


_FORMATS: dict[str, Callable[[str], ToolFormat]] = {
    "auto": detect_tool_format,
    "hermes": lambda source: HermesFormat(),
    "llama3_json": lambda source: Llama3JsonFormat(),
    "mistral": lambda source: MistralFormat(args_marker=ARGS in source),
}
"""``--tool-call-parser`` values: the format each makes of the chat template's source."""


def history(messages: Sequence[dict[str, Any]], fmt: ToolFormat) -> list[dict[str, Any]]:
    """Template messages with tool-call history written as text, for templates that know
    neither ``tool_calls`` nor tool results: an assistant turn's calls follow its content as
    the format writes them, and a tool result becomes a user turn holding
    ``<tool_response>`` blocks (consecutive results in one turn), as Qwen's template writes
    them."""
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
            calls = fmt.render_calls([(c["function"]["name"], c["function"]["arguments"])
                                      for c in message["tool_calls"]])
            content = message["content"]
            out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        else:
            out.append(message)
    return out
