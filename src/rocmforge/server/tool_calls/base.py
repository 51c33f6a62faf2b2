"""What every tool-call format provides, and the parse of a whole output built on it.

A format (:mod:`.hermes`, :mod:`.llama3`, :mod:`.mistral`) says where the calls begin in a
model's output (:meth:`ToolFormat.start`, and how much of an unfinished output to hold back
because it may be the start of a marker: :meth:`ToolFormat.holdback`), reads the calls from
there on as far as they go (:meth:`ToolFormat.scan`, the same code for streamed and whole
outputs), writes calls the way the model would (for tool-call history and the tools prompt
of templates that know no tools), and gives the Lark grammar that forces calls of given
tools (``tool_choice`` ``required`` or named).
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rocmforge.server.tool_calls.json_scan import PartialCall
from rocmforge.structured.compiler import JSON_OPTIONS, closed_schema


class TokenLookup(Protocol):
    """The part of the tokenizer a format reads: its control tokens."""

    def token_to_id(self, text: str) -> int | None: ...

    def is_special(self, token_id: int) -> bool: ...


def openai_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    """One parsed call: the function's name, its arguments as the JSON text the model wrote,
    and the id the server gave it."""

    name: str
    arguments: str
    id: str = field(default_factory=openai_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ToolFormat(ABC):
    """A way models write tool calls (module docstring): where they begin, how they read,
    how they are written, and the grammar that forces them."""

    name: str
    """The ``--tool-call-parser`` value that selects it."""
    control_tokens: tuple[str, ...] = ()
    """Control tokens the format writes: their text must stay in the output for the parser
    (the detokenizer would skip them)."""

    @abstractmethod
    def start(self, text: str) -> int:
        """Where the calls begin in ``text`` (an output so far), or -1."""

    @abstractmethod
    def holdback(self, text: str) -> int:
        """How many characters at the end of ``text`` (which has no calls yet) may begin
        them, and so are not yet sure to be content."""

    @abstractmethod
    def scan(self, region: str) -> list[PartialCall]:
        """The calls in ``region`` (the output from :meth:`start` on), the last possibly
        incomplete. Raises ValueError when the region is not (the start of) calls."""

    @abstractmethod
    def render_calls(self, calls: Sequence[tuple[str, Any]]) -> str:
        """``(name, arguments object)`` calls written as the model writes them."""

    @abstractmethod
    def grammar(self, tools: Sequence[dict[str, Any]], parallel: bool, tokens: TokenLookup) -> str:
        """Lark grammar of one call (with ``parallel``, one or more) of ``tools``, each with
        arguments valid against the tool's parameters (objects closed)."""

    def new_call_id(self) -> str:
        return openai_call_id()

    def tools_prompt(self, tools: Sequence[dict[str, Any]]) -> str:
        """A system-prompt section offering ``tools``, for templates that do not render them."""
        listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        example = self.render_calls([("<function-name>", {"<argument>": "<value>"})])
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n"
                f"</tools>\n\nTo call functions, reply with nothing else than the calls, written like this:\n{example}")

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """``(content, calls)`` of a whole output. Content is the text before the first call,
        without the whitespace that ends it (None when nothing else is left). When what follows the start is not complete, well-formed calls
        with object arguments, the whole output is content (the model did not call a tool
        after all)."""
        start = self.start(text)
        if start < 0:
            return text, []
        try:
            partial = self.scan(text[start:])
        except ValueError:
            return text, []
        calls = []
        for call in partial:
            if not call.complete or call.name is None or not _is_object(call.arguments):
                return text, []
            calls.append(ParsedToolCall(call.name, call.arguments, self.new_call_id()))
        if not calls:
            return text, []
        content = text[:start].rstrip()
        return content or None, calls


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):  # nested past the parser's depth: no call either
        return False


def call_schema(tools: Sequence[dict[str, Any]], arguments_key: str = "arguments") -> dict[str, Any]:
    """JSON schema of one call object ``{"name": <a tool's>, <arguments_key>: <its parameters>}``."""
    return {"anyOf": [
        {"type": "object",
         "properties": {"name": {"const": tool["function"]["name"]},
                        arguments_key: closed_schema(tool["function"].get("parameters") or {"type": "object"})},
         "required": ["name", arguments_key], "additionalProperties": False}
        for tool in tools
    ], "x-guidance": JSON_OPTIONS}


def marker_prefix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (shorter than it)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def lark_token(text: str, tokens: TokenLookup) -> str:
    """Lark for the control token ``text`` (by id: llguidance's ``<[id]>``) when the
    vocabulary has it as one, else for its text."""
    token_id = tokens.token_to_id(text)
    if token_id is not None and tokens.is_special(token_id):
        return f"<[{token_id}]>"
    return json.dumps(text)
