"""The hand-off between the vocabulary builders and :class:`~rocmforge.tokenizer.Tokenizer`.

Builders (:mod:`.gguf_vocab` from GGUF metadata, :mod:`.hf_file` from an HF
``tokenizer.json``) each produce one :class:`TokenizerParts`: a ready HF ``tokenizers``
backend plus everything the wrapper needs that the backend does not know (token types as
llama.cpp defines them, special ids, BOS/EOS flags, how token text maps to bytes, the chat
template source).  The wrapper owns the parts from then on; nothing mutates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum

import tokenizers


class TokenType(IntEnum):
    """``tokenizer.ggml.token_type`` values (llama.cpp's ``llama_token_type``)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class TokenStyle(str, Enum):
    """How a token's text spells the bytes it stands for."""

    BYTE_LEVEL = "byte_level"
    """GPT-2's byte-to-unicode alphabet: every byte is one printable character (``Ġ`` = space)."""
    SENTENCEPIECE = "sentencepiece"
    """``▁`` stands for a space and ``<0xXX>`` byte tokens for single bytes."""
    PLAIN = "plain"
    """The token text is the text (UTF-8)."""


@dataclass(frozen=True, slots=True)
class SpecialIds:
    """Ids of the tokens with a role; ``None`` where the vocabulary has none."""

    bos: int | None = None
    eos: int | None = None
    unk: int | None = None
    pad: int | None = None
    eot: int | None = None
    """End of turn (``<|eot_id|>``, ``<|im_end|>``, ...) when the file names one."""
    eom: int | None = None
    """End of message (Llama 3.1 tool calls: ``<|eom_id|>``)."""


@dataclass(frozen=True, slots=True)
class TokenizerParts:
    """Everything a :class:`~rocmforge.tokenizer.Tokenizer` is made of."""

    backend: tokenizers.Tokenizer
    """Encodes text (special tokens in the text are parsed) and decodes ids; adds no BOS/EOS.
    Special added tokens must be exactly the control and unknown tokens: the tokenizer's
    plain-text copy of it (``encode_special_tokens``) stops matching those."""
    tokens: tuple[str, ...]
    """Token text by id, exactly as the vocabulary stores it."""
    token_types: tuple[int, ...]
    """:class:`TokenType` value by id."""
    style: TokenStyle
    special: SpecialIds
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    """SentencePiece only: a space is prepended to the text, and decode strips one again."""
    chat_template: str | None
