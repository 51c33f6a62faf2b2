"""Every string a chat template is given: counted, checked, and (for ``encode_chat``) rewritten.

In: the messages and the template variables of one render, as JSON-like values (mappings,
lists, tuples, strings, numbers, booleans, ``None``).  Out: :func:`scan_strings` -- the
total length of their strings (mapping keys included), after checking each is valid
Unicode; :func:`map_strings` -- a copy with every string passed through a function, a
container rebuilt only where something inside it changed (so the common case returns the
caller's own objects).  Other objects are passed as they are, not looked into.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rocmforge.errors import ChatTemplateError
from rocmforge.tokenizer.unicode_text import find_lone_surrogate, invalid_unicode_message

MAX_DEPTH = 100
"""Deepest nesting of lists and mappings accepted in messages and variables."""


def scan_strings(value: Any, name: str) -> int:
    """Characters in every string inside ``value`` (the variable ``name``).

    Raises :class:`ChatTemplateError` (``param=name``) naming the path of the first string
    that is not valid Unicode, or when the value is nested deeper than :data:`MAX_DEPTH`.
    """
    return _scan(value, name, name, 0)


def _scan(value: Any, path: str, name: str, depth: int) -> int:
    if isinstance(value, str):
        index = find_lone_surrogate(value)
        if index is not None:
            raise ChatTemplateError(invalid_unicode_message(path, value, index), param=name)
        return len(value)
    if depth >= MAX_DEPTH:
        raise ChatTemplateError(f"{path} is nested more than {MAX_DEPTH} levels deep", param=name)
    total = 0
    if isinstance(value, Mapping):
        for key, item in value.items():
            total += _scan(key, f"a key of {path}", name, depth + 1)
            total += _scan(item, f"{path}.{key}", name, depth + 1)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            total += _scan(item, f"{path}[{index}]", name, depth + 1)
    return total


def map_strings(value: Any, function: Callable[[str], str]) -> Any:
    """``value`` with ``function`` applied to every string in it, keys included.

    ``function`` must return its argument itself when it changes nothing; containers with
    nothing changed inside are returned as they are.  Mappings are rebuilt as ``dict``.
    """
    return _map(value, function, 0)


def _map(value: Any, function: Callable[[str], str], depth: int) -> Any:
    if isinstance(value, str):
        return function(value)
    if depth >= MAX_DEPTH:
        raise ChatTemplateError(f"messages or variables nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, Mapping):
        pairs = [
            (_map(key, function, depth + 1), _map(item, function, depth + 1))
            for key, item in value.items()
        ]
        originals = value.items()
        if all(a is c and b is d for (a, b), (c, d) in zip(pairs, originals, strict=True)):
            return value
        return dict(pairs)
    if isinstance(value, (list, tuple)):
        items = [_map(item, function, depth + 1) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return tuple(items) if isinstance(value, tuple) else items
    return value
