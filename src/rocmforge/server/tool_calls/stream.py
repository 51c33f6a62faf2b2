"""Streaming a choice's tool calls as OpenAI ``tool_calls`` deltas, as the model writes them.

Content passes through until the format's calls begin (a tail that may begin a marker is
held back, and so is trailing whitespace, which a call that follows drops as the whole
parse does). From there each call is announced once its name is whole and its arguments
have begun as an object (``id``, ``type``, ``function.name``, empty ``arguments``), and its arguments follow piece by piece as raw JSON
text, so the pieces concatenate to the final ``arguments``. At the end the whole output is
parsed (:meth:`ToolFormat.parse`, the same scan): what the stream sent and what a
non-streamed answer holds agree. The one exception: calls that turn out malformed at the
end (not JSON, cut off by ``max_tokens``) may already have been announced; the non-streamed
answer has their text as content, and the stream ends with that unsent text as content too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rocmforge.server.tool_calls.base import ParsedToolCall, ToolFormat
from rocmforge.server.tool_calls.json_scan import PartialCall


class ToolCallStream:
    """One choice's content and tool-call deltas (module docstring)."""

    def __init__(self, fmt: ToolFormat) -> None:
        self._fmt = fmt
        self._text = ""
        self._sent = 0
        """Characters of the output sent as content."""
        self._start = -1
        """Where the calls begin, once seen."""
        self._ids: list[str] = []
        self._arguments: list[str] = []
        self._broken = False

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        """``(content that is surely content, tool_calls deltas)`` of the next piece of output."""
        self._text += delta
        content = ""
        if self._start < 0:
            start = self._fmt.start(self._text)
            if start < 0:
                return self._take(_unspaced(self._text, len(self._text) - self._fmt.holdback(self._text))), []
            self._start = start
            content = self._take(_unspaced(self._text, start))
        if self._broken:
            return content, []
        try:
            calls = self._fmt.scan(self._text[self._start:])
        except ValueError:
            self._broken = True
            return content, []
        return content, self._deltas(calls)

    def finish(self, full_text: str) -> tuple[str, list[dict[str, Any]], list[ParsedToolCall]]:
        """At the end: ``(content not yet sent, last tool_calls deltas, the calls)``."""
        _, calls = self._fmt.parse(full_text)
        if not calls:
            return full_text[self._sent:], [], []
        deltas = self._deltas([PartialCall(c.name, c.arguments, True) for c in calls])
        start = self._fmt.start(full_text)
        end = _unspaced(full_text, start)
        return (full_text[self._sent:end] if end > self._sent else "", deltas,
                [replace(call, id=call_id) for call, call_id in zip(calls, self._ids)])

    def _take(self, end: int) -> str:
        if end <= self._sent:
            return ""
        piece, self._sent = self._text[self._sent:end], end
        return piece

    def _deltas(self, calls: list[PartialCall]) -> list[dict[str, Any]]:
        """What is new in ``calls`` since the last call of this: one delta per call at most."""
        deltas = []
        for index, call in enumerate(calls):
            if call.name is None or not (call.arguments or call.complete):
                break  # announced once its arguments begin: arguments that are no object fail first
            delta: dict[str, Any] = {"index": index}
            function: dict[str, str] = {}
            if index == len(self._ids):
                self._ids.append(self._fmt.new_call_id())
                self._arguments.append("")
                delta.update(id=self._ids[index], type="function")
                function["name"] = call.name
            sent = self._arguments[index]
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                function["arguments"] = call.arguments[len(sent):]
                self._arguments[index] = call.arguments
            elif "name" in function:
                function["arguments"] = ""
            if function:
                deltas.append({**delta, "function": function})
        return deltas


def _unspaced(text: str, end: int) -> int:
    """``end`` moved back over the whitespace that ends ``text[:end]``."""
    while end > 0 and text[end - 1].isspace():
        end -= 1
    return end
