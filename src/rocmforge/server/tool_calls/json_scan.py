"""Reading JSON that may still be arriving: where a value ends, and a call object's name and
raw arguments so far.

The tool-call parsers scan a model's output token by token: a value is *complete* (its end
is known), *incomplete* (the text ends inside it: more may come), or malformed
(:class:`ValueError`: it cannot become JSON). Arguments are kept as the raw text the model
wrote, so what is streamed piece by piece is always a prefix of the final arguments.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

_WHITESPACE = " \t\n\r"
_SCALAR_END = _WHITESPACE + ",]}:"


@dataclass(slots=True)
class PartialCall:
    """A call as far as the output goes: its name once written whole, its arguments' raw
    JSON text so far (``"{}"`` when it has none), and whether the call is complete."""

    name: str | None = None
    arguments: str = ""
    complete: bool = False


def skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def value_end(text: str, pos: int) -> int | None:
    """End (exclusive) of the JSON value starting at ``text[pos]``; None when the text ends
    inside it. Raises ValueError at what cannot be JSON (the value is checked for structure,
    not for every detail: :func:`json.loads` decides in the end)."""
    if pos >= len(text):
        return None
    first = text[pos]
    if first == '"':
        return _string_end(text, pos)
    if first not in "{[":
        end = pos
        while end < len(text) and text[end] not in _SCALAR_END:
            end += 1
        if end == pos:
            raise ValueError(f"no JSON value at {text[pos:pos + 10]!r}")
        return end if end < len(text) else None  # a number may go on
    closers = []
    index = pos
    while index < len(text):
        char = text[index]
        if char == '"':
            string_end = _string_end(text, index)
            if string_end is None:
                return None
            index = string_end
            continue
        if char in "{[":
            closers.append("}" if char == "{" else "]")
        elif char in "}]":
            if not closers or closers.pop() != char:
                raise ValueError("unbalanced brackets")
            if not closers:
                return index + 1
        index += 1
    return None


def _string_end(text: str, pos: int) -> int | None:
    index = pos + 1
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == '"':
            return index + 1
        index += 1
    return None


def scan_call_object(text: str, pos: int, *, name_key: str = "name",
                     argument_keys: Collection[str] = ("arguments",)) -> tuple[PartialCall, int]:
    """Read ``{"name": ..., "arguments": {...}}`` (keys in any order, others ignored) from
    ``text[pos]``. Returns the call so far and where it ends (the text's length when it is
    incomplete). Raises ValueError when it cannot be such an object."""
    call = PartialCall()
    seen_arguments = False
    if pos >= len(text):
        return call, len(text)
    if text[pos] != "{":
        raise ValueError("a call is a JSON object")
    index = pos + 1
    while True:
        index = skip_space(text, index)
        if index >= len(text):
            return call, len(text)
        if text[index] == "}":
            break
        if text[index] != '"':
            raise ValueError("expected a key")
        key_end = _string_end(text, index)
        if key_end is None:
            return call, len(text)
        key = json.loads(text[index:key_end])
        index = skip_space(text, key_end)
        if index >= len(text):
            return call, len(text)
        if text[index] != ":":
            raise ValueError("expected ':'")
        start = skip_space(text, index + 1)
        end = value_end(text, start)
        if key == name_key:
            if end is not None:
                name = json.loads(text[start:end])
                if not isinstance(name, str):
                    raise ValueError("the name is not a string")
                call.name = name
        elif key in argument_keys and not seen_arguments:  # the first of two argument keys counts
            if start < len(text) and text[start] != "{":
                raise ValueError("the arguments are not an object")
            call.arguments = text[start:end] if end is not None else text[start:]
            seen_arguments = True
        if end is None:
            return call, len(text)
        index = skip_space(text, end)
        if index >= len(text):
            return call, len(text)
        if text[index] == ",":
            index += 1
        elif text[index] != "}":
            raise ValueError("expected ',' or '}'")
    if call.name is None:
        raise ValueError("a call without a name")
    if not seen_arguments:
        call.arguments = "{}"
    call.complete = True
    return call, index + 1
