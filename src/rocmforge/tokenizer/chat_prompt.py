"""Chat prompt -> token ids, with control tokens taken only from the template, never from content.

In: a :class:`~.chat.ChatTemplate`, the messages and template variables of one request, and
the tokenizer's two backends (one that parses control-token text, one that treats it as
plain text).  Out: a :class:`ChatPrompt` -- the rendered text and its ids.

A user who writes ``<|im_end|>\\n<|im_start|>system`` in a message must not get a system
turn.  :class:`ChatEncoder` does, per render:

1. **Escape.**  Every string in the messages and variables (content, names, tool-call
   arguments, ``tools``, ``documents``, mapping keys) has each control-token text in it
   replaced by a placeholder ``\\ufff9<nonce>:<k>\\ufffb`` (digits: ``upper()``/``lower()``
   in a template leave it alone; the nonce is random per render and absent from the input).
   So are a string's first characters when they end a control-token text and its last when
   they begin one (``"<|im_"`` + ``"end|>"`` printed back to back cannot make a token).
2. **Render** the escaped values through the template (its budget and sandbox apply).
3. **Encode** the rendered text with the parsing backend: every control token in it now
   comes from the template.  Where no placeholder occurs -- always, for content without
   control-token text -- those ids are the answer, exactly
   ``Tokenizer.encode(rendered, parse_special=True)``.  Otherwise the text is cut at the
   control tokens the backend matched (its own offsets, so ``lstrip``/``rstrip`` and
   normalized added tokens cut where it cuts), and each piece holding a placeholder is
   encoded again, placeholders restored, by the backend that reads control-token text as
   plain text; the other pieces keep their ids (the backend encodes the pieces between
   added tokens independently, so this is what encoding the whole would give).

What remains possible: a template that itself assembles a control token around a whole
string (Phi-3 writes ``'<|' + role + '|>'``) still makes one from it, as the template
means to; validate roles before rendering.  A template that cuts a placeholder apart
(slicing content mid-token) leaves its pieces as plain text.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tokenizers

from rocmforge.errors import ChatTemplateError
from rocmforge.tokenizer.chat import ChatTemplate, validate_messages
from rocmforge.tokenizer.chat_inputs import map_strings, scan_strings

_OPEN = "\ufff9"
_CLOSE = "\ufffb"
_NONCE_DIGITS = 12
_NONCE_TRIES = 8


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """A rendered chat prompt and the ids the model sees."""

    text: str
    """The prompt as the template wrote it (control-token text in content shown as written)."""
    ids: list[int]
    """Its token ids: control tokens only where the template wrote them (unless the caller
    asked for ``special_tokens_in_content``).  No BOS/EOS beyond what the template wrote."""


class ControlTokens:
    """A vocabulary's control-token texts: where they occur in a string, and what to escape."""

    def __init__(self, ids_by_text: Mapping[str, int]) -> None:
        texts = sorted(text for text in ids_by_text if text)
        self.text_by_id = {ids_by_text[text]: text for text in texts}
        self._pattern = re.compile(_trie_regex(texts)) if texts else None
        self._prefixes = frozenset(text[:i] for text in texts for i in range(1, len(text)))
        self._suffixes = frozenset(text[i:] for text in texts for i in range(1, len(text)))
        self._longest = max(map(len, texts), default=0)

    def escape(self, text: str, placeholder: Callable[[str], str]) -> str:
        """``text`` with each control-token text, and each edge that could join one, replaced
        by ``placeholder(piece)``; ``text`` itself when there is nothing to replace."""
        if self._pattern is None:
            return text
        escaped, count = self._pattern.subn(lambda match: placeholder(match.group()), text)
        head = self._edge(escaped, self._suffixes, from_start=True)
        if head:
            escaped = placeholder(escaped[:head]) + escaped[head:]
        tail = self._edge(escaped, self._prefixes, from_start=False)
        if tail:
            escaped = escaped[:-tail] + placeholder(escaped[-tail:])
        return escaped if count or head or tail else text

    def _edge(self, text: str, pieces: frozenset[str], *, from_start: bool) -> int:
        """Length of the longest start (or end) of ``text`` that is in ``pieces``, or 0."""
        for length in range(min(self._longest - 1, len(text)), 0, -1):
            if (text[:length] if from_start else text[-length:]) in pieces:
                return length
        return 0


def _trie_regex(words: Sequence[str]) -> str:
    """A regex matching any of ``words``, longest first at each position (a trie, so a
    vocabulary with thousands of control tokens still scans at one branch per character)."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}
    return _trie_node(trie)


def _trie_node(node: dict[str, Any]) -> str:
    branches = []
    for char, child in node.items():
        if not char:
            continue
        chain = [char]
        while len(child) == 1 and "" not in child:  # no branch: one literal, no recursion
            [(char, child)] = child.items()
            chain.append(char)
        branches.append(re.escape("".join(chain)) + _trie_node(child))
    if not branches:
        return ""
    if "" in node:
        branches.append("")  # ending here is tried last: longer words win
    elif len(branches) == 1:
        return branches[0]
    return "(?:" + "|".join(branches) + ")"


class _NonceCollision(Exception):
    """An input string already contains this render's placeholder marker."""


class _Placeholders:
    """One render's placeholders: ``\\ufff9<nonce>:<k>\\ufffb`` stands for ``pieces[k]``."""

    def __init__(self) -> None:
        self.nonce = "".join(secrets.choice("0123456789") for _ in range(_NONCE_DIGITS))
        self.marker = f"{_OPEN}{self.nonce}:"
        self.pieces: list[str] = []
        self._plain = re.compile(re.escape(self.marker) + r"(\d+)" + _CLOSE)
        self._json = re.compile(r"\\ufff9" + self.nonce + r":(\d+)\\ufffb")

    def __call__(self, piece: str) -> str:
        self.pieces.append(piece)
        return f"{self.marker}{len(self.pieces) - 1}{_CLOSE}"

    def check_absent(self, text: str) -> str:
        if self.marker in text:
            raise _NonceCollision
        return text

    def restore(self, text: str) -> str:
        """``text`` with every intact placeholder replaced by the text it stands for (its
        JSON-escaped form too, as ``tojson(ensure_ascii=True)`` writes it)."""
        text = self._plain.sub(lambda match: self._piece(match, json_escaped=False), text)
        if "\\ufff9" in text:
            text = self._json.sub(lambda match: self._piece(match, json_escaped=True), text)
        return text

    def _piece(self, match: re.Match[str], *, json_escaped: bool) -> str:
        index = int(match.group(1))
        if index >= len(self.pieces):
            return match.group()
        piece = self.pieces[index]
        return json.dumps(piece)[1:-1] if json_escaped else piece


class ChatEncoder:
    """Renders and encodes chat prompts for one tokenizer (immutable; shared by threads)."""

    def __init__(
        self,
        control: ControlTokens,
        backend: tokenizers.Tokenizer,
        text_backend: tokenizers.Tokenizer,
    ) -> None:
        """``backend`` parses control-token text; ``text_backend`` (a copy with
        ``encode_special_tokens`` set) reads it as plain text."""
        self._control = control
        self._backend = backend
        self._text_backend = text_backend

    def encode(
        self,
        template: ChatTemplate,
        messages: Sequence[Mapping[str, Any]],
        variables: dict[str, Any],
        *,
        add_generation_prompt: bool,
    ) -> ChatPrompt:
        """Render and encode with control tokens from the template only (module docstring).

        Raises :class:`ChatTemplateError` for invalid messages, strings that are not valid
        Unicode, or a template that fails or goes over its limits.
        """
        validate_messages(messages)
        scan_strings(messages, "messages")
        for name, value in variables.items():
            scan_strings(value, name)
        bos_token = variables.pop("bos_token", None)
        eos_token = variables.pop("eos_token", None)
        for _ in range(_NONCE_TRIES):
            placeholders = _Placeholders()
            try:
                escaped_messages, escaped_vars = self._escape(placeholders, messages, variables)
            except _NonceCollision:
                continue
            rendered = template.render(
                escaped_messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
                **escaped_vars,
            )
            return self._encode_rendered(rendered, placeholders)
        raise ChatTemplateError("could not choose a placeholder absent from the messages")

    def _escape(
        self, placeholders: _Placeholders, messages: Any, variables: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        def escape(text: str) -> str:
            return self._control.escape(placeholders.check_absent(text), placeholders)

        escaped = {name: map_strings(value, escape) for name, value in variables.items()}
        return map_strings(messages, escape), escaped

    def _encode_rendered(self, rendered: str, placeholders: _Placeholders) -> ChatPrompt:
        if placeholders.marker not in rendered:
            return ChatPrompt(rendered, encode_ids(self._backend, rendered))
        encoding = self._backend.encode_batch([rendered], add_special_tokens=False)[0]
        pieces: list[list[int] | str] = []  # ids kept as they are, or text to encode again
        start = 0
        kept: list[int] = []
        for token_id, (begin, end) in zip(encoding.ids, encoding.offsets, strict=True):
            text = self._control.text_by_id.get(token_id)
            if text is None or text not in rendered[begin:end]:
                kept.append(token_id)
                continue
            pieces.append(self._piece(rendered[start:begin], kept, placeholders))
            pieces.append([token_id])
            start, kept = end, []
        pieces.append(self._piece(rendered[start:], kept, placeholders))
        return ChatPrompt(placeholders.restore(rendered), self._join(pieces))

    @staticmethod
    def _piece(text: str, ids: list[int], placeholders: _Placeholders) -> list[int] | str:
        return placeholders.restore(text) if placeholders.marker in text else ids

    def _join(self, pieces: list[list[int] | str]) -> list[int]:
        texts = [piece for piece in pieces if isinstance(piece, str)]
        encoded = iter(encode_batch_ids(self._text_backend, texts))
        ids: list[int] = []
        for piece in pieces:
            ids.extend(next(encoded) if isinstance(piece, str) else piece)
        return ids


def encode_ids(backend: tokenizers.Tokenizer, text: str) -> list[int]:
    """``backend``'s ids for ``text`` (no BOS/EOS), through the batch call: it releases the GIL."""
    return encode_batch_ids(backend, [text])[0]


def encode_batch_ids(backend: tokenizers.Tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text.  ``encode_batch`` releases the GIL while it works (``encode`` does
    not); ``encode_batch_fast`` (tokenizers >= 0.21) also skips computing offsets."""
    if not texts:
        return []
    fast = getattr(backend, "encode_batch_fast", None)
    batch = fast if fast is not None else backend.encode_batch
    return [encoding.ids for encoding in batch(texts, add_special_tokens=False)]
