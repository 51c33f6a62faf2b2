"""The raw bytes each token stands for (what an incremental detokenizer concatenates).

In: token texts, their :class:`~.vocab.TokenType` values and the vocabulary's
:class:`~.vocab.TokenStyle`.  Out: one ``bytes`` per token id, following llama.cpp's
``token_to_piece`` with special tokens shown:

* control, unknown and user-defined tokens: their text, UTF-8 encoded;
* byte-level (GPT-2) tokens: each character mapped back through the byte-to-unicode
  alphabet (a character outside it -- never produced by the BPE -- is kept as UTF-8);
* SentencePiece tokens: ``▁`` becomes a space, a ``<0xXX>`` byte token becomes that byte;
* plain tokens: their text, UTF-8 encoded.

A SentencePiece decode additionally strips the one space the encoder prepended; that is a
property of the whole text, not of a token, so it is not applied here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

from rocmforge.tokenizer.vocab import TokenStyle, TokenType

_TEXT_TYPES = frozenset({TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED})
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPM_SPACE = "\u2581"
_NOT_A_BYTE = "\uffff"  # not latin-1 encodable: makes the fast byte-level path fail over


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.cache
def _byte_level_translation() -> dict[int, str]:
    """str.translate table: alphabet character -> the latin-1 character of its byte.

    Code points below 256 that are not in the alphabet map to a character latin-1 cannot
    encode, so ``text.translate(t).encode("latin-1")`` either gives the token's bytes or
    fails, and the slow path handles the failure.
    """
    table: dict[int, str] = {cp: _NOT_A_BYTE for cp in range(256)}
    for byte, char in bytes_to_unicode().items():
        table[ord(char)] = chr(byte)
    return table


@functools.cache
def _byte_decoder() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


def byte_level_bytes(text: str) -> bytes:
    """The bytes a byte-level (GPT-2 alphabet) token spells."""
    try:
        return text.translate(_byte_level_translation()).encode("latin-1")
    except UnicodeEncodeError:
        decoder = _byte_decoder()
        return b"".join(
            bytes([decoder[ch]]) if ch in decoder else ch.encode("utf-8") for ch in text
        )


def sentencepiece_bytes(text: str, token_type: int) -> bytes:
    """The bytes a SentencePiece token stands for (``▁`` = space, ``<0xXX>`` = one byte)."""
    if token_type == TokenType.BYTE:
        match = _BYTE_TOKEN.fullmatch(text)
        if match is not None:
            return bytes([int(match.group(1), 16)])
    return text.replace(_SPM_SPACE, " ").encode("utf-8")


def _byte_level_piece(text: str, token_type: int) -> bytes:
    return byte_level_bytes(text)


def _plain_piece(text: str, token_type: int) -> bytes:
    return text.encode("utf-8")


_PIECE_BYTES: dict[TokenStyle, Callable[[str, int], bytes]] = {
    TokenStyle.BYTE_LEVEL: _byte_level_piece,
    TokenStyle.SENTENCEPIECE: sentencepiece_bytes,
    TokenStyle.PLAIN: _plain_piece,
}


def token_bytes_table(
    tokens: Sequence[str], token_types: Sequence[int], style: TokenStyle
) -> tuple[bytes, ...]:
    """``bytes`` for every token id (see the module docstring for the rules)."""
    piece = _PIECE_BYTES[style]
    return tuple(
        text.encode("utf-8") if ttype in _TEXT_TYPES else piece(text, ttype)
        for text, ttype in zip(tokens, token_types, strict=True)
    )
