"""The engine's tokenizer: text <-> token ids, token bytes, stop tokens, chat prompts.

In: GGUF metadata (:meth:`Tokenizer.from_gguf_metadata`) or an HF ``tokenizer.json``
override (:meth:`Tokenizer.from_file`).  Out: ``encode`` gives the ids the model sees
(control tokens written in the text are parsed unless ``parse_special=False``; BOS/EOS
only on request), ``encode_chat`` renders a conversation through the chat template and
encodes it so that control tokens come only from the template (:mod:`.chat_prompt`),
``decode``/``token_bytes`` turn ids back into text/bytes, ``stop_ids`` end generation.

The HF ``tokenizers`` backend does the BPE work, in two copies built once: one parses
control-token text (``<|im_start|>``), the other has ``encode_special_tokens`` set and
reads it as plain text (llama.cpp's ``parse_special=false``: control and unknown tokens are
not matched, user-defined ones still are).  Encoding and decoding go through the batch
calls, which release the GIL (measured on a 0.9 MB prompt: ``encode`` held it 680 ms,
``encode_batch`` let a 1 ms ticker thread through within 16 ms; ``decode`` 28 ms vs
``decode_batch`` 3.5 ms), so a worker thread encoding a long prompt does not stall the
server's event loop.  Text that is not valid Unicode (a lone surrogate, which JSON allows)
is a :class:`~rocmforge.errors.TokenizerError`.  This wrapper owns everything llama.cpp
keeps beside the vocabulary (token types, special ids, flags) and is immutable after
construction, so one instance is safely shared by every request.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from rocmforge.errors import ChatTemplateError, TokenizerError
from rocmforge.tokenizer.chat import ChatTemplate
from rocmforge.tokenizer.chat_prompt import ChatEncoder, ChatPrompt, ControlTokens, encode_ids
from rocmforge.tokenizer.gguf_vocab import parts_from_gguf_metadata
from rocmforge.tokenizer.hf_file import parts_from_file
from rocmforge.tokenizer.template_limits import TemplateLimits
from rocmforge.tokenizer.token_bytes import token_bytes_table
from rocmforge.tokenizer.unicode_text import find_lone_surrogate, invalid_unicode_message
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
    max_token_bytes: int
    """The most bytes one token stands for: a text of ``n`` UTF-8 bytes has at least
    ``n / max_token_bytes`` tokens (so a caller can refuse an over-long text untokenized)."""
    chat_template: ChatTemplate | None

    def __init__(
        self, parts: TokenizerParts, *, template_limits: TemplateLimits | None = None
    ) -> None:
        """Wrap built parts.  Raises :class:`TokenizerError` when ``add_bos``/``add_eos`` is set
        without a BOS/EOS id, and :class:`~rocmforge.errors.ChatTemplateError` when the chat
        template does not compile.  ``template_limits`` bound each chat-template render
        (default: :class:`TemplateLimits`)."""
        if parts.add_bos and parts.special.bos is None:
            raise TokenizerError("the vocabulary asks for a BOS token but names no BOS id")
        if parts.add_eos and parts.special.eos is None:
            raise TokenizerError("the vocabulary asks for an EOS token but names no EOS id")
        self._backend = parts.backend
        self._text_backend = _plain_text_copy(parts.backend)
        self._tokens = parts.tokens
        self._bytes = token_bytes_table(parts.tokens, parts.token_types, parts.style)
        self._special = frozenset(
            index for index, ttype in enumerate(parts.token_types) if ttype in _SPECIAL_TYPES
        )
        control = ControlTokens({parts.tokens[index]: index for index in sorted(self._special)})
        self._chat = ChatEncoder(control, self._backend, self._text_backend)
        self.vocab_size = len(parts.tokens)
        self.special_ids = parts.special
        self.bos_id = parts.special.bos
        self.eos_id = parts.special.eos
        self.add_bos = parts.add_bos
        self.add_eos = parts.add_eos
        self.add_space_prefix = parts.add_space_prefix
        self.style = parts.style
        self.max_token_bytes = max(map(len, self._bytes), default=1)
        self.stop_ids = self._find_stop_ids(parts)
        self.chat_template = (
            ChatTemplate(
                parts.chat_template,
                bos_token=self._text_of(self.bos_id),
                eos_token=self._text_of(self.eos_id),
                limits=template_limits,
            )
            if parts.chat_template
            else None
        )

    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, Any], *, template_limits: TemplateLimits | None = None
    ) -> Tokenizer:
        """Build from GGUF metadata (``tokenizer.ggml.*`` keys and ``tokenizer.chat_template``).

        Raises :class:`~rocmforge.errors.MissingMetadataError` for absent required keys and
        :class:`TokenizerError` for unsupported or inconsistent ones.
        """
        start = time.perf_counter()
        tokenizer = cls(parts_from_gguf_metadata(metadata), template_limits=template_limits)
        logger.info(
            "built %s tokenizer from GGUF metadata: %d tokens in %.0f ms",
            tokenizer.style.value,
            tokenizer.vocab_size,
            (time.perf_counter() - start) * 1e3,
        )
        return tokenizer

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        metadata: Mapping[str, Any] | None = None,
        *,
        template_limits: TemplateLimits | None = None,
    ) -> Tokenizer:
        """Build from an HF ``tokenizer.json``; special ids, flags and the chat template from
        ``metadata`` when given, else from ``tokenizer_config.json`` beside the file."""
        return cls(parts_from_file(path, metadata), template_limits=template_limits)

    def encode(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        ``parse_special``: control tokens written in the text (``<|im_start|>``) become
        their ids; with ``False`` they are plain text (control and unknown tokens are not
        matched, user-defined ones still are, as llama.cpp's ``parse_special``).
        ``add_special`` adds BOS (when ``add_bos``) and EOS (when ``add_eos``).  A rendered
        chat prompt usually writes BOS itself: encode it with ``add_special=False``, or use
        :meth:`encode_chat`.  Raises :class:`TokenizerError` when ``text`` is not a string or
        not valid Unicode (a lone surrogate; the message gives its position).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode must be a string, got {type(text).__name__}")
        backend = self._backend if parse_special else self._text_backend
        try:
            ids = encode_ids(backend, text)
        except TypeError as exc:  # the backend's answer to a lone surrogate
            index = find_lone_surrogate(text)
            if index is None:
                raise TokenizerError(f"the tokenizer cannot encode this text: {exc}") from exc
            raise TokenizerError(invalid_unicode_message("text to encode", text, index)) from exc
        if add_special:
            # __init__ guarantees the ids exist when the flags are set
            if self.add_bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self.add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
        return ids

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        special_tokens_in_content: bool = False,
        **template_vars: Any,
    ) -> ChatPrompt:
        """Render ``messages`` through the chat template and encode the prompt.

        Control tokens come only from the template: control-token text anywhere in the
        messages or ``template_vars`` (content, names, tool calls, ``tools``, ``documents``)
        is tokenized as plain text (:mod:`.chat_prompt` says how, and that it is exact).
        ``special_tokens_in_content=True`` parses it like the template's own text instead
        (the behaviour before; for trusted callers that write control tokens on purpose).
        ``template_vars`` are the template's variables (``tools``, ``enable_thinking``,
        ``bos_token``, ...).  No BOS/EOS is added beyond what the template writes.

        Raises :class:`~rocmforge.errors.ChatTemplateError` when the model has no chat
        template, the messages are invalid or not valid Unicode, or the template fails or
        goes over its limits.
        """
        template = self.chat_template
        if template is None:
            raise ChatTemplateError("this model has no chat template (tokenizer.chat_template)")
        if special_tokens_in_content:
            text = template.render(messages, add_generation_prompt, **template_vars)
            return ChatPrompt(text, self.encode(text))
        return self._chat.encode(
            template, messages, dict(template_vars), add_generation_prompt=add_generation_prompt
        )

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The text of ``ids``; ``skip_special`` leaves out control tokens (BOS, EOS, ...)."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenizerError(f"token id {bad} is out of range [0, {self.vocab_size})")
        try:
            # decode_batch releases the GIL (decode holds it: 28 ms for 200k tokens)
            [text] = self._backend.decode_batch([ids], skip_special_tokens=skip_special)
        except TypeError as exc:
            raise TokenizerError(f"token ids must be integers: {exc}") from exc
        return str(text)

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


def _plain_text_copy(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A copy of ``backend`` that encodes special (control) token text as plain text.

    The flag is set once here and never toggled, so both backends stay safe to share.
    """
    text_backend = copy.deepcopy(backend)
    text_backend.encode_special_tokens = True
    return text_backend
