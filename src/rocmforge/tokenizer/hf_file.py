"""Load an HF ``tokenizer.json`` as an override for the vocabulary a GGUF carries.

In: the path of a ``tokenizer.json``; optionally the GGUF metadata.  Out:
:class:`~.vocab.TokenizerParts`.  The file decides how text is split and merged.  Special
ids, BOS/EOS flags and the chat template come from the metadata when it is given;
otherwise from ``tokenizer_config.json`` (and ``chat_template.jinja``) beside the file,
with BOS/EOS flags read off the file's post-processor when the config does not set them.
Token types are derived from the file's added tokens (special -> control, others ->
user-defined, so ``encode(parse_special=False)`` treats them as llama.cpp does); how token
text maps to bytes from its decoder.  Truncation and padding the file configures are
turned off: the engine checks prompt lengths itself and never wants pad tokens.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from rocmforge.errors import TokenizerError
from rocmforge.tokenizer import metadata as md
from rocmforge.tokenizer.vocab import SpecialIds, TokenizerParts, TokenStyle, TokenType

logger = logging.getLogger(__name__)

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_CONFIG_FILE = "tokenizer_config.json"
_TEMPLATE_FILE = "chat_template.jinja"


def parts_from_file(path: str | Path, metadata: Mapping[str, Any] | None = None) -> TokenizerParts:
    """Build the parts from an HF ``tokenizer.json`` (see the module docstring).

    Raises :class:`TokenizerError` when the file (or the config beside it) cannot be read
    or parsed, or describes an empty vocabulary.
    """
    path = Path(path)
    text = _read_text(path)
    spec = _parse_json(text, path)
    try:
        backend = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises plain Exception for a bad file
        raise TokenizerError(f"{path}: not a valid tokenizer.json: {exc}") from exc
    if backend.truncation is not None or backend.padding is not None:
        logger.info("%s: ignoring the truncation/padding the file configures", path)
        backend.no_truncation()
        backend.no_padding()

    vocab = backend.get_vocab(with_added_tokens=True)
    if not vocab:
        raise TokenizerError(f"{path}: the tokenizer has an empty vocabulary")
    tokens = [""] * (max(vocab.values()) + 1)
    for text, index in vocab.items():
        tokens[index] = text
    style, strips_prefix = _style(spec.get("decoder"))
    types = _token_types(backend, tokens, style)

    probe = backend.encode("", add_special_tokens=True).ids
    if metadata is not None:
        special = md.read_special_ids(metadata, len(tokens))
        add_bos = md.get_bool(metadata, md.ADD_BOS, _starts_with(probe, special.bos))
        add_eos = md.get_bool(metadata, md.ADD_EOS, _ends_with(probe, special.eos))
        template = md.get_str(metadata, md.CHAT_TEMPLATE)
    else:
        config_path = path.parent / _CONFIG_FILE
        config = _read_json(config_path) if config_path.is_file() else {}
        special = SpecialIds(
            bos=_config_token_id(backend, config, "bos_token"),
            eos=_config_token_id(backend, config, "eos_token"),
            unk=_config_token_id(backend, config, "unk_token"),
            pad=_config_token_id(backend, config, "pad_token"),
        )
        add_bos = _config_flag(config, "add_bos_token", _starts_with(probe, special.bos))
        add_eos = _config_flag(config, "add_eos_token", _ends_with(probe, special.eos))
        template = _config_template(config, path.parent / _TEMPLATE_FILE)
    logger.info("loaded tokenizer %s: %d tokens, %s", path, len(tokens), style.value)
    return TokenizerParts(
        backend=backend,
        tokens=tuple(tokens),
        token_types=tuple(types),
        style=style,
        special=special,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=strips_prefix,
        chat_template=template,
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    return _parse_json(_read_text(path), path)


def _parse_json(text: str, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _decoder_nodes(node: Any) -> list[dict[str, Any]]:
    """The decoder and, for a ``Sequence``, every decoder inside it (flattened)."""
    if not isinstance(node, dict):
        return []
    found = [node]
    for child in node.get("decoders") or ():
        found.extend(_decoder_nodes(child))
    return found


def _style(decoder: Any) -> tuple[TokenStyle, bool]:
    """The token style a decoder implies, and whether it strips a prepended space."""
    nodes = _decoder_nodes(decoder)
    kinds = {node.get("type") for node in nodes}
    if "ByteLevel" in kinds:
        return TokenStyle.BYTE_LEVEL, False
    if kinds & {"ByteFallback", "Metaspace"}:
        strips = any(
            (node.get("type") == "Strip" and node.get("start", 0) > 0)
            or (node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never")
            for node in nodes
        )
        return TokenStyle.SENTENCEPIECE, strips
    return TokenStyle.PLAIN, False


def _token_types(backend: Tokenizer, tokens: list[str], style: TokenStyle) -> list[int]:
    types = [int(TokenType.NORMAL)] * len(tokens)
    if style is TokenStyle.SENTENCEPIECE:
        for index, text in enumerate(tokens):
            if _BYTE_TOKEN.fullmatch(text):
                types[index] = TokenType.BYTE
    for index, added in backend.get_added_tokens_decoder().items():
        types[index] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED
    return types


def _starts_with(ids: list[int], token_id: int | None) -> bool:
    return token_id is not None and bool(ids) and ids[0] == token_id


def _ends_with(ids: list[int], token_id: int | None) -> bool:
    return token_id is not None and bool(ids) and ids[-1] == token_id


def _config_token_id(backend: Tokenizer, config: Mapping[str, Any], key: str) -> int | None:
    """The id of ``config[key]`` (a token text, or ``{"content": text}``), if it is a token."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        return None
    token_id = backend.token_to_id(value)
    if token_id is None:
        logger.warning("%s %r from %s is not in the vocabulary", key, value, _CONFIG_FILE)
    return token_id


def _config_flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TokenizerError(f"{_CONFIG_FILE}: {key!r} must be a boolean, got {value!r}")
    return value


def _config_template(config: Mapping[str, Any], template_file: Path) -> str | None:
    """``chat_template`` from the config (a string, or a list of named templates: the
    ``default`` one), else the text of ``chat_template.jinja`` beside it, else ``None``."""
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if isinstance(value, str):
        return value
    if value is not None:
        raise TokenizerError(f"{_CONFIG_FILE}: 'chat_template' has no usable default template")
    if template_file.is_file():
        return _read_text(template_file)
    return None
