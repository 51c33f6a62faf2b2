"""Typed reads of the tokenizer keys of GGUF metadata.

In: the metadata mapping (``str`` key -> python value, arrays as lists), as
``rocmforge.gguf.read_gguf(path).metadata`` or ``gguf.GGUFReader`` ``field.contents()``
produce it.  Out: checked python values; a value of the wrong type is a
:class:`~rocmforge.errors.TokenizerError` naming the key, a missing required key a
:class:`~rocmforge.errors.MissingMetadataError`.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Collection, Mapping
from typing import Any

from rocmforge.errors import MissingMetadataError, TokenizerError
from rocmforge.tokenizer.vocab import SpecialIds

logger = logging.getLogger(__name__)

MODEL = "tokenizer.ggml.model"
PRE = "tokenizer.ggml.pre"
TOKENS = "tokenizer.ggml.tokens"
TOKEN_TYPE = "tokenizer.ggml.token_type"
SCORES = "tokenizer.ggml.scores"
MERGES = "tokenizer.ggml.merges"
ADD_BOS = "tokenizer.ggml.add_bos_token"
ADD_EOS = "tokenizer.ggml.add_eos_token"
ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
CHAT_TEMPLATE = "tokenizer.chat_template"

# SpecialIds field -> metadata key.  A bad id for a token the engine relies on is an error;
# a bad padding id is only logged (files with pad == n_vocab exist in the wild, and the
# engine never uses the pad token).
SPECIAL_ID_KEYS: dict[str, str] = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
}
_LENIENT_SPECIAL_IDS = frozenset({"pad"})
_NO_IDS = SpecialIds()


def _type_error(key: str, expected: str, value: Any) -> TokenizerError:
    return TokenizerError(
        f"GGUF metadata {key!r} must be {expected}, got {type(value).__name__}", param=key
    )


def get_str(metadata: Mapping[str, Any], key: str) -> str | None:
    """The string under ``key``, or ``None`` when absent."""
    value = metadata.get(key)
    if value is not None and not isinstance(value, str):
        raise _type_error(key, "a string", value)
    return value


def require_str(metadata: Mapping[str, Any], key: str) -> str:
    """The string under ``key``; :class:`MissingMetadataError` when absent."""
    value = get_str(metadata, key)
    if value is None:
        raise MissingMetadataError(f"GGUF metadata has no {key!r}", param=key)
    return value


def get_bool(metadata: Mapping[str, Any], key: str, default: bool) -> bool:
    """The boolean under ``key`` (0/1 integers accepted), or ``default`` when absent."""
    value = metadata.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    try:
        as_int = operator.index(value)
    except TypeError:
        raise _type_error(key, "a boolean", value) from None
    if as_int not in (0, 1):
        raise _type_error(key, "a boolean", value)
    return bool(as_int)


def get_int(metadata: Mapping[str, Any], key: str) -> int | None:
    """The integer under ``key``, or ``None`` when absent."""
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise _type_error(key, "an integer", value)
    try:
        return operator.index(value)
    except TypeError:
        raise _type_error(key, "an integer", value) from None


def _get_list(metadata: Mapping[str, Any], key: str, *, required: bool) -> list[Any] | None:
    value = metadata.get(key)
    if value is None:
        if required:
            raise MissingMetadataError(f"GGUF metadata has no {key!r}", param=key)
        return None
    # lists from our reader and gguf-py; numpy arrays are Collections too
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Collection):
        raise _type_error(key, "an array", value)
    return list(value)


def get_str_list(
    metadata: Mapping[str, Any], key: str, *, required: bool = False
) -> list[str] | None:
    """The array of strings under ``key``."""
    values = _get_list(metadata, key, required=required)
    if values is not None and not all(isinstance(v, str) for v in values):
        raise _type_error(key, "an array of strings", values)
    return values


def get_number_list(
    metadata: Mapping[str, Any], key: str, length: int, *, integer: bool
) -> list[Any] | None:
    """The array of numbers under ``key``, which must have ``length`` entries (one per token)."""
    values = _get_list(metadata, key, required=False)
    if values is None:
        return None
    if len(values) != length:
        raise TokenizerError(
            f"GGUF metadata {key!r} has {len(values)} entries for {length} tokens", param=key
        )
    try:
        return [operator.index(v) for v in values] if integer else [float(v) for v in values]
    except (TypeError, ValueError):
        kind = "integers" if integer else "numbers"
        raise _type_error(key, f"an array of {kind}", values) from None


def read_special_ids(
    metadata: Mapping[str, Any], n_tokens: int, defaults: SpecialIds = _NO_IDS
) -> SpecialIds:
    """Special token ids from the metadata, ``defaults`` where a key is absent.

    An id outside ``[0, n_tokens)`` raises :class:`TokenizerError` (for padding it is
    logged and dropped instead).
    """
    ids: dict[str, int | None] = {}
    for field, key in SPECIAL_ID_KEYS.items():
        value = get_int(metadata, key)
        if value is None:
            default = getattr(defaults, field)
            ids[field] = default if default is not None and 0 <= default < n_tokens else None
        elif 0 <= value < n_tokens:
            ids[field] = value
        elif field in _LENIENT_SPECIAL_IDS:
            logger.warning("ignoring %s = %d: out of range for %d tokens", key, value, n_tokens)
            ids[field] = None
        else:
            raise TokenizerError(
                f"GGUF metadata {key!r} = {value} is out of range for a vocabulary of "
                f"{n_tokens} tokens",
                param=key,
            )
    return SpecialIds(**ids)
