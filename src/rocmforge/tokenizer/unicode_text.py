"""Whether a Python string is valid Unicode text, and where it is not.

In: a ``str``.  Out: the index of its first lone surrogate (``"\\ud800"``), or ``None``.
JSON allows ``"\\ud800"``, so such strings reach the server's request objects; the HF
``tokenizers`` backend refuses them with an untyped ``TypeError``, and no model was trained
on them, so the tokenizer and the chat template reject them up front with a typed error
naming the position.
"""

from __future__ import annotations

import re

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def find_lone_surrogate(text: str) -> int | None:
    """The index of the first surrogate code point in ``text`` (never valid alone in a str)."""
    match = _LONE_SURROGATE.search(text)
    return None if match is None else match.start()


def invalid_unicode_message(what: str, text: str, index: int) -> str:
    """``"<what> is not valid Unicode: lone surrogate U+D800 at character 3"``."""
    code_point = ord(text[index])
    return f"{what} is not valid Unicode: lone surrogate U+{code_point:04X} at character {index}"
