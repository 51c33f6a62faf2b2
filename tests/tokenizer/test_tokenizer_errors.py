"""Bad metadata and bad arguments raise typed errors with messages that say what is wrong."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from synthetic_vocabs import byte_level_metadata, spm_metadata

from rocmforge.errors import (
    ErrorCategory,
    MissingMetadataError,
    RocmForgeError,
    TokenizerError,
)
from rocmforge.tokenizer import Tokenizer

MERGES = ["Ġ t", "h e"]


def _without(metadata: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k != key}


@pytest.mark.parametrize(
    ("metadata", "missing"),
    [
        (_without(byte_level_metadata(MERGES), "tokenizer.ggml.tokens"), "tokenizer.ggml.tokens"),
        (_without(byte_level_metadata(MERGES), "tokenizer.ggml.model"), "tokenizer.ggml.model"),
        (_without(byte_level_metadata(MERGES), "tokenizer.ggml.merges"), "tokenizer.ggml.merges"),
        (_without(spm_metadata(), "tokenizer.ggml.scores"), "tokenizer.ggml.scores"),
    ],
)
def test_missing_keys(metadata: dict[str, Any], missing: str) -> None:
    with pytest.raises(MissingMetadataError, match=missing) as info:
        Tokenizer.from_gguf_metadata(metadata)
    assert info.value.param == missing


def test_unknown_model() -> None:
    with pytest.raises(TokenizerError, match=r"unsupported tokenizer model 'bert'.*gpt2, llama"):
        Tokenizer.from_gguf_metadata(
            {**byte_level_metadata(MERGES), "tokenizer.ggml.model": "bert"}
        )


def test_empty_token_list() -> None:
    meta = {
        **byte_level_metadata(MERGES),
        "tokenizer.ggml.tokens": [],
        "tokenizer.ggml.token_type": [],
    }
    with pytest.raises(TokenizerError, match="is empty"):
        Tokenizer.from_gguf_metadata(meta)


@pytest.mark.parametrize(
    ("merge", "message"),
    [
        ("Ġ zz", "refers to 'zz'"),
        ("x y", "refers to 'xy'"),  # both halves exist, their concatenation is not a token
        ("nospace", "not two tokens"),
    ],
)
def test_bad_merges(merge: str, message: str) -> None:
    meta = byte_level_metadata(MERGES)
    meta["tokenizer.ggml.merges"] = [*MERGES, merge]
    with pytest.raises(TokenizerError, match=f"merge #2 .*{message}"):
        Tokenizer.from_gguf_metadata(meta)


@pytest.mark.parametrize(
    "key", ["bos_token_id", "eos_token_id", "eot_token_id", "unknown_token_id"]
)
@pytest.mark.parametrize("value", [-1, 10**6])
def test_special_id_out_of_range(key: str, value: int) -> None:
    meta = {**byte_level_metadata(MERGES), f"tokenizer.ggml.{key}": value}
    with pytest.raises(TokenizerError, match=f"tokenizer.ggml.{key}.*out of range"):
        Tokenizer.from_gguf_metadata(meta)


def test_padding_id_out_of_range_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    meta = byte_level_metadata(MERGES)
    meta["tokenizer.ggml.padding_token_id"] = len(meta["tokenizer.ggml.tokens"])
    with caplog.at_level(logging.WARNING):
        tokenizer = Tokenizer.from_gguf_metadata(meta)
    assert tokenizer.special_ids.pad is None
    assert "padding_token_id" in caplog.text


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tokenizer.ggml.token_type", [1, 1], "has 2 entries for"),
        ("tokenizer.ggml.tokens", ["a", 3], "array of strings"),
        ("tokenizer.ggml.tokens", "abc", "must be an array"),
        ("tokenizer.ggml.model", 7, "must be a string"),
        ("tokenizer.ggml.add_bos_token", "yes", "must be a boolean"),
        ("tokenizer.ggml.bos_token_id", 1.5, "must be an integer"),
    ],
)
def test_wrongly_typed_values(key: str, value: Any, message: str) -> None:
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_gguf_metadata({**byte_level_metadata(MERGES), key: value})


def test_add_bos_without_bos_id() -> None:
    meta = _without(byte_level_metadata(MERGES), "tokenizer.ggml.bos_token_id")
    meta["tokenizer.ggml.add_bos_token"] = True
    with pytest.raises(TokenizerError, match="names no BOS id"):
        Tokenizer.from_gguf_metadata(meta)


def test_bad_arguments() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(byte_level_metadata(MERGES))
    n = tokenizer.vocab_size
    with pytest.raises(TokenizerError, match="out of range"):
        tokenizer.decode([0, n])
    with pytest.raises(TokenizerError, match="out of range"):
        tokenizer.decode([-1])
    with pytest.raises(TokenizerError, match="integers"):
        tokenizer.decode([1.5])  # type: ignore[list-item]
    with pytest.raises(TokenizerError, match="out of range"):
        tokenizer.token_bytes(n)
    with pytest.raises(TokenizerError, match="out of range"):
        tokenizer.is_special(-1)
    with pytest.raises(TokenizerError, match="must be a string"):
        tokenizer.encode(b"bytes")  # type: ignore[arg-type]


def test_errors_are_user_errors() -> None:
    with pytest.raises(RocmForgeError) as info:
        Tokenizer.from_gguf_metadata(
            {**byte_level_metadata(MERGES), "tokenizer.ggml.model": "bert"}
        )
    assert info.value.category is ErrorCategory.USER
    assert info.value.to_dict()["code"] == "tokenizer_error"
