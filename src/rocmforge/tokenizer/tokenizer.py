"""The engine's tokenizer: text <-> token ids, token bytes, stop tokens, chat template.

In: GGUF metadata (:meth:`Tokenizer.from_gguf_metadata`) or an HF ``tokenizer.json``
override (:meth:`Tokenizer.from_file`).  Out: ``encode`` gives the ids the model sees
(special tokens written in the text are always parsed; BOS/EOS only on request),
``decode``/``token_bytes`` turn ids back into text/bytes, ``stop_ids`` end generation, and
``chat_template`` (when the model has one) renders conversations.

The HF ``tokenizers`` backend does the BPE work; this wrapper owns everything llama.cpp
keeps beside the vocabulary (token types, special ids, flags) and is immutable after
construction, so one instance is safely shared by every request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rocmforge.errors import TokenizerError
from rocmforge.tokenizer.chat import ChatTemplate
from rocmforge.tokenizer.gguf_vocab import parts_from_gguf_metadata
from rocmforge.tokenizer.hf_file import parts_from_file
from rocmforge.tokenizer.token_bytes import token_bytes_table
from rocmforge.tokenizer.vocab import SpecialIds, TokenizerParts, TokenStyle, TokenType

logger = logging.getLogger(__name__)

# End-of-turn / end-of-text tokens of common chat models: generation stops on them when
# the vocabulary has them as control tokens, whatever the file names as EOS.
STOP_TOKEN_TEXTS: frozenset[str] = frozenset(
    {
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end_of_text|>",
        "<|endoftext|>",
        "<|end|>",
        "<end_of_turn>",
        "<EOT>",
    }
)
_SPECIAL_TYPES = frozenset({TokenType.CONTROL, TokenType.UNKNOWN})


class Tokenizer:
    """Encodes and decodes text for one model (see the module docstring)."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    special_ids: SpecialIds
    stop_ids: frozenset[int]
    """Token ids that end generation: EOS, EOT and EOM ids plus :data:`STOP_TOKEN_TEXTS`."""
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    """SentencePiece: ``decode`` drops the first leading space (the one ``encode`` added)."""
    style: TokenStyle
    chat_template: ChatTemplate | None

    def __init__(self, parts: TokenizerParts) -> None:
        """Wrap built parts.  Raises :class:`TokenizerError` when ``add_bos``/``add_eos`` is set
        without a BOS/EOS id, and :class:`~rocmforge.errors.ChatTemplateError` when the chat
        template does not compile."""
        if parts.add_bos and parts.special.bos is None:
            raise TokenizerError("the vocabulary asks for a BOS token but names no BOS id")
        if parts.add_eos and parts.special.eos is None:
            raise TokenizerError("the vocabulary asks for an EOS token but names no EOS id")
        self._backend = parts.backend
        self._tokens = parts.tokens
        self._bytes = token_bytes_table(parts.tokens, parts.token_types, parts.style)
        self._special = frozenset(
            index for index, ttype in enumerate(parts.token_types) if ttype in _SPECIAL_TYPES
        )
        self.vocab_size = len(parts.tokens)
        self.special_ids = parts.special
        self.bos_id = parts.special.bos
        self.eos_id = parts.special.eos
        self.add_bos = parts.add_bos
        self.add_eos = parts.add_eos
        self.add_space_prefix = parts.add_space_prefix
        self.style = parts.style
        self.stop_ids = self._find_stop_ids(parts)
        self.chat_template = (
            ChatTemplate(
                parts.chat_template,
                bos_token=self._text_of(self.bos_id),
                eos_token=self._text_of(self.eos_id),
            )
            if parts.chat_template
            else None
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (``tokenizer.ggml.*`` keys and ``tokenizer.chat_template``).

        Raises :class:`~rocmforge.errors.MissingMetadataError` for absent required keys and
        :class:`TokenizerError` for unsupported or inconsistent ones.
        """
        start = time.perf_counter()
        tokenizer = cls(parts_from_gguf_metadata(metadata))
        logger.info(
            "built %s tokenizer from GGUF metadata: %d tokens in %.0f ms",
            tokenizer.style.value,
            tokenizer.vocab_size,
            (time.perf_counter() - start) * 1e3,
        )
        return tokenizer

    @classmethod
    def from_file(cls, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Tokenizer:
        """Build from an HF ``tokenizer.json``; special ids, flags and the chat template from
        ``metadata`` when given, else from ``tokenizer_config.json`` beside the file."""
        return cls(parts_from_file(path, metadata))

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of ``text``.  Special tokens written in it (``<|im_start|>``) are parsed.

        ``add_special`` adds BOS (when ``add_bos``) and EOS (when ``add_eos``).  A rendered
        chat prompt usually writes BOS itself: encode it with ``add_special=False``.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode must be a string, got {type(text).__name__}")
        ids: list[int] = self._backend.encode(text, add_special_tokens=False).ids
        if add_special:
            # __init__ guarantees the ids exist when the flags are set
            if self.add_bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self.add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The text of ``ids``; ``skip_special`` leaves out control tokens (BOS, EOS, ...)."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenizerError(f"token id {bad} is out of range [0, {self.vocab_size})")
        try:
            return self._backend.decode(ids, skip_special_tokens=skip_special)
        except TypeError as exc:
            raise TokenizerError(f"token ids must be integers: {exc}") from exc

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (control tokens: their text as UTF-8).

        Bytes, not text: a byte-level or byte-fallback token may be part of a UTF-8
        character.  Concatenating ``token_bytes`` and decoding gives ``decode(ids)``, except
        that SentencePiece ``decode`` drops the first leading space when ``add_space_prefix``.
        """
        self._check_id(token_id)
        return self._bytes[token_id]

    def is_special(self, token_id: int) -> bool:
        """Whether the token is a control (or unknown) token, hidden by ``skip_special``."""
        self._check_id(token_id)
        return token_id in self._special

    def id_to_token(self, token_id: int) -> str:
        """The token's text as the vocabulary stores it (``Ġthe``, ``▁the``, ``<|im_end|>``)."""
        self._check_id(token_id)
        return self._tokens[token_id]

    def token_to_id(self, text: str) -> int | None:
        """The id of the token whose stored text is ``text``, or ``None``."""
        return self._backend.token_to_id(text)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.style.value}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, stop={sorted(self.stop_ids)})"
        )

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is out of range [0, {self.vocab_size})")

    def _text_of(self, token_id: int | None) -> str:
        return "" if token_id is None else self._tokens[token_id]

    def _find_stop_ids(self, parts: TokenizerParts) -> frozenset[int]:
        ids = {
            i for i in (parts.special.eos, parts.special.eot, parts.special.eom) if i is not None
        }
        for text in STOP_TOKEN_TEXTS:
            token_id = self._backend.token_to_id(text)
            if token_id is not None and parts.token_types[token_id] == TokenType.CONTROL:
                ids.add(token_id)
        return frozenset(ids)
