"""Build an HF ``tokenizers`` tokenizer from a GGUF file's tokenizer metadata.

In: the GGUF metadata mapping (``tokenizer.ggml.*`` keys, arrays as lists).
Out: :class:`~.vocab.TokenizerParts` -- a ``tokenizers.Tokenizer`` that encodes like
llama.cpp (special tokens written in the text are parsed; no BOS/EOS added), plus token
types, special ids, BOS/EOS flags and the chat template source.

Which builder runs is a table keyed by ``tokenizer.ggml.model``:

* ``gpt2``: byte-level BPE.  Merges from the file, pre-tokenizer regexes from the table in
  :mod:`.pretokenizers` keyed by ``tokenizer.ggml.pre``, GPT-2 byte alphabet.
* ``llama``: SentencePiece-style BPE.  Merges derived from the scores (or taken from the
  file when it has them), ``<0xXX>`` byte fallback, ``▁`` for spaces, an optional space
  prepended to every run of text (llama.cpp prepends after each special token too).

Control and unknown tokens become special added tokens, user-defined tokens plain added
tokens (both matched whole in the text, never normalized); user-defined tokens are not
"special" because llama.cpp prints them even when it hides special tokens, and matches
them even when it does not parse special tokens -- the tokenizer's plain-text copy of the
backend (``encode_special_tokens``) skips exactly the special ones, as llama.cpp's
``parse_special=false`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from rocmforge.errors import MissingMetadataError, TokenizerError
from rocmforge.tokenizer import metadata as md
from rocmforge.tokenizer.merges import merges_from_scores, parse_merges
from rocmforge.tokenizer.pretokenizers import pre_tokenizer_spec
from rocmforge.tokenizer.vocab import SpecialIds, TokenizerParts, TokenStyle, TokenType

logger = logging.getLogger(__name__)

_SPM_SPACE = "\u2581"
_SPECIAL_TYPES = frozenset({TokenType.CONTROL, TokenType.UNKNOWN})
# llama.cpp's SentencePiece defaults when the file names no special ids
_SPM_DEFAULT_IDS = SpecialIds(bos=1, eos=2, unk=0)


def parts_from_gguf_metadata(metadata: Mapping[str, Any]) -> TokenizerParts:
    """Validate the tokenizer metadata and build the tokenizer it describes.

    Raises :class:`MissingMetadataError` when ``tokenizer.ggml.model``, the token list or
    a key the model type needs is absent, and :class:`TokenizerError` for an unsupported
    model type or inconsistent values (array lengths, merges, special ids).
    """
    model = md.require_str(metadata, md.MODEL)
    builder = _BUILDERS.get(model)
    if builder is None:
        raise TokenizerError(
            f"unsupported tokenizer model {model!r} in {md.MODEL!r} "
            f"(supported: {', '.join(sorted(_BUILDERS))})",
            param=md.MODEL,
        )
    tokens = md.get_str_list(metadata, md.TOKENS, required=True)
    if not tokens:
        raise TokenizerError(f"GGUF metadata {md.TOKENS!r} is empty", param=md.TOKENS)
    types = md.get_number_list(metadata, md.TOKEN_TYPE, len(tokens), integer=True)
    if types is None:
        types = [TokenType.NORMAL] * len(tokens)
    return builder(metadata, tokens, types)


def _build_byte_level(
    metadata: Mapping[str, Any], tokens: list[str], types: list[int]
) -> TokenizerParts:
    raw_merges = md.get_str_list(metadata, md.MERGES)
    if raw_merges is None:
        raise MissingMetadataError(
            f"a 'gpt2' (byte-level BPE) vocabulary needs {md.MERGES!r}", param=md.MERGES
        )
    vocab = _vocab_dict(tokens)
    spec = pre_tokenizer_spec(md.get_str(metadata, md.PRE))
    backend = Tokenizer(
        models.BPE(
            vocab=vocab, merges=parse_merges(raw_merges, vocab), ignore_merges=spec.ignore_merges
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in spec.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    _add_tokens(backend, tokens, types)
    return TokenizerParts(
        backend=backend,
        tokens=tuple(tokens),
        token_types=tuple(types),
        style=TokenStyle.BYTE_LEVEL,
        special=md.read_special_ids(metadata, len(tokens)),
        add_bos=md.get_bool(metadata, md.ADD_BOS, spec.add_bos),
        add_eos=md.get_bool(metadata, md.ADD_EOS, False),
        add_space_prefix=False,
        chat_template=md.get_str(metadata, md.CHAT_TEMPLATE),
    )


def _build_sentencepiece(
    metadata: Mapping[str, Any], tokens: list[str], types: list[int]
) -> TokenizerParts:
    vocab = _vocab_dict(tokens)
    raw_merges = md.get_str_list(metadata, md.MERGES)
    if raw_merges is not None:
        merges = parse_merges(raw_merges, vocab)
    else:
        scores = md.get_number_list(metadata, md.SCORES, len(tokens), integer=False)
        if scores is None:
            raise MissingMetadataError(
                f"a 'llama' (SentencePiece) vocabulary needs {md.SCORES!r} (or {md.MERGES!r})",
                param=md.SCORES,
            )
        merges = merges_from_scores(tokens, scores, vocab)
    special = md.read_special_ids(metadata, len(tokens), _SPM_DEFAULT_IDS)
    add_space_prefix = md.get_bool(metadata, md.ADD_SPACE_PREFIX, True)
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[special.unk] if special.unk is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    space = normalizers.Replace(" ", _SPM_SPACE)
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), space])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        backend.normalizer = space
    backend.decoder = decoders.Sequence(steps)
    _add_tokens(backend, tokens, types)
    return TokenizerParts(
        backend=backend,
        tokens=tuple(tokens),
        token_types=tuple(types),
        style=TokenStyle.SENTENCEPIECE,
        special=special,
        add_bos=md.get_bool(metadata, md.ADD_BOS, True),
        add_eos=md.get_bool(metadata, md.ADD_EOS, False),
        add_space_prefix=add_space_prefix,
        chat_template=md.get_str(metadata, md.CHAT_TEMPLATE),
    )


_BUILDERS: dict[str, Callable[[Mapping[str, Any], list[str], list[int]], TokenizerParts]] = {
    "gpt2": _build_byte_level,
    "llama": _build_sentencepiece,
}


def _vocab_dict(tokens: Sequence[str]) -> dict[str, int]:
    """Token text -> id.  A duplicated text keeps its last id (as llama.cpp), logged."""
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        logger.warning(
            "vocabulary has %d duplicated token texts; each text maps to its last id",
            len(tokens) - len(vocab),
        )
    return vocab


def _add_tokens(backend: Tokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Register control/unknown (special) and user-defined (not special) tokens by text.

    They already have their ids in the BPE vocabulary; registering makes the backend match
    them whole in the input text instead of cutting them into pieces.
    """
    special = [
        AddedToken(text, special=True, normalized=False)
        for text, ttype in zip(tokens, types, strict=True)
        if ttype in _SPECIAL_TYPES and text
    ]
    user = [
        AddedToken(text, special=False, normalized=False)
        for text, ttype in zip(tokens, types, strict=True)
        if ttype == TokenType.USER_DEFINED and text
    ]
    backend.add_special_tokens(special)
    backend.add_tokens(user)
