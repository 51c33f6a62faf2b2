"""Tiny synthetic GGUF tokenizer metadata, built in plain Python so each test states exactly
which tokens, scores and merges it relies on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rocmforge.tokenizer import Tokenizer
from rocmforge.tokenizer.token_bytes import bytes_to_unicode

SPM_SPACE = "\u2581"


def _split_merge(merge: str) -> tuple[str, str]:
    cut = merge.find(" ", 1)
    return merge[:cut], merge[cut + 1 :]


def byte_level_metadata(
    merges: Sequence[str],
    *,
    pre: str | None = "gpt2",
    extra_tokens: Sequence[str] = (),
    control: Sequence[str] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    user_defined: Sequence[str] = (),
) -> dict[str, Any]:
    """A tiny ``gpt2`` vocabulary: control tokens, the 256 byte characters, merge results."""
    tokens = [*control, *bytes_to_unicode().values()]
    types = [3] * len(control) + [1] * 256
    for merge in merges:
        merged = "".join(_split_merge(merge))
        if merged not in tokens:
            tokens.append(merged)
            types.append(1)
    for token in extra_tokens:
        tokens.append(token)
        types.append(1)
    for token in user_defined:
        tokens.append(token)
        types.append(4)
    metadata: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": list(merges),
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }
    if pre is not None:
        metadata["tokenizer.ggml.pre"] = pre
    return metadata


SPM_WORDS = ("hello", "world", "the", "cat", "sat", "on", "mat", "hell")


def spm_metadata(
    words: Sequence[str] = SPM_WORDS, *, add_space_prefix: bool | None = None
) -> dict[str, Any]:
    """A tiny ``llama`` (SentencePiece) vocabulary.

    ``<unk> <s> </s>``, the 256 ``<0xXX>`` byte tokens, the single letters of ``words`` and
    every prefix of ``"▁" + word``.  Shorter pieces score higher, so merges build words
    left to right: ``▁`` + ``h`` -> ``▁h``, ``▁h`` + ``e`` -> ``▁he``, ...
    """
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    pieces: list[str] = [SPM_SPACE]
    for word in words:
        pieces.extend(ch for ch in word if ch not in pieces)
    for word in words:
        spelled = SPM_SPACE + word
        pieces.extend(
            p for p in (spelled[:n] for n in range(2, len(spelled) + 1)) if p not in pieces
        )
    for index, piece in enumerate(dict.fromkeys(pieces)):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(len(piece)) - index * 1e-3)
    metadata: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    if add_space_prefix is not None:
        metadata["tokenizer.ggml.add_space_prefix"] = add_space_prefix
    return metadata


def texts_of(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The stored token texts of ``ids`` (for readable assertions)."""
    return [tokenizer.id_to_token(i) for i in ids]
