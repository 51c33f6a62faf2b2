"""A tiny SentencePiece-style (``llama``) vocabulary: merges from scores, byte fallback,
space prefix, BOS, decode and token bytes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic_vocabs import SPM_SPACE, spm_metadata, texts_of

from rocmforge.tokenizer import Tokenizer
from rocmforge.tokenizer.merges import merges_from_scores


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(spm_metadata())


def test_words_in_the_vocab_are_single_tokens(spm: Tokenizer) -> None:
    ids = spm.encode("hello world")
    assert texts_of(spm, ids) == ["▁hello", "▁world"]
    assert ids == [spm.token_to_id("▁hello"), spm.token_to_id("▁world")]
    assert texts_of(spm, spm.encode("the cat sat on the mat")) == [
        "▁the",
        "▁cat",
        "▁sat",
        "▁on",
        "▁the",
        "▁mat",
    ]


def test_merges_follow_scores() -> None:
    """Best-scoring merged token first; ties by longer left half (as HF's extractor)."""
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert merges_from_scores(tokens, scores, vocab) == [
        ("b", "c"),
        ("a", "b"),
        ("ab", "c"),
        ("a", "bc"),
    ]


def test_byte_fallback_for_characters_not_in_the_vocab(spm: Tokenizer) -> None:
    assert texts_of(spm, spm.encode("hello ☃")) == ["▁hello", "▁", "<0xE2>", "<0x98>", "<0x83>"]
    assert texts_of(spm, spm.encode("zebra")) == ["▁", "<0x7A>", "e", "<0x62>", "r", "a"]


def test_space_prefix_after_every_special_token(spm: Tokenizer) -> None:
    """llama.cpp prepends a space to each run of text that follows a special token."""
    assert texts_of(spm, spm.encode("hello<s>hello")) == ["▁hello", "<s>", "▁hello"]
    assert texts_of(spm, spm.encode(" hello")) == ["▁", "▁hello"]
    assert spm.encode("") == []


def test_no_space_prefix_when_the_file_says_so() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm_metadata(add_space_prefix=False))
    assert tokenizer.add_space_prefix is False
    assert texts_of(tokenizer, tokenizer.encode("hello world")) == [
        "h",
        "e",
        "l",
        "l",
        "o",
        "▁world",
    ]
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"


def test_bos_added_by_default(spm: Tokenizer) -> None:
    assert spm.add_bos is True and spm.add_eos is False
    assert spm.encode("hello", add_special=True) == [1, spm.token_to_id("▁hello")]
    assert spm.encode("hello") == [spm.token_to_id("▁hello")]
    meta = {
        **spm_metadata(),
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": True,
    }
    no_bos = Tokenizer.from_gguf_metadata(meta)
    assert no_bos.encode("hello", add_special=True) == [no_bos.token_to_id("▁hello"), 2]


def test_special_ids_default_like_llamacpp() -> None:
    meta = spm_metadata()
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id"):
        del meta[f"tokenizer.ggml.{key}"]
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.special_ids.unk) == (1, 2, 0)
    assert tokenizer.stop_ids == frozenset({2})


@pytest.mark.parametrize(
    "text",
    ["hello world", "hello ☃ world", " hello", "  hello  world ", "zebra\n\ttab", "héllo wörld 😀"],
)
def test_decode_round_trip(spm: Tokenizer, text: str) -> None:
    ids = spm.encode(text)
    assert spm.decode(ids) == text
    joined = b"".join(spm.token_bytes(i) for i in ids).decode("utf-8")
    assert joined == " " + text  # token bytes keep the prefix space decode strips


def test_decode_special_tokens(spm: Tokenizer) -> None:
    ids = [*spm.encode("hello", add_special=True), 2]
    assert spm.decode(ids) == "<s> hello</s>"
    assert spm.decode(ids, skip_special=True) == "hello"
    assert spm.is_special(1) and spm.is_special(0) and not spm.is_special(spm.token_to_id("▁hello"))


def test_token_bytes(spm: Tokenizer) -> None:
    assert spm.token_bytes(spm.token_to_id("▁hello")) == b" hello"
    assert spm.token_bytes(spm.token_to_id("<0xE2>")) == b"\xe2"
    assert spm.token_bytes(spm.token_to_id("<0x41>")) == b"A"
    assert spm.token_bytes(1) == b"<s>"
    assert spm.token_bytes(0) == b"<unk>"
    assert spm.token_bytes(spm.token_to_id(SPM_SPACE)) == b" "


# Texts transformers' GGUF llama tokenizer handles the same way: it prepends "▁" only when
# the text does not already start with a space and never after a special token, where
# llama.cpp (and we) always prepend -- so no leading whitespace and no special tokens here.
_SPM_TEXTS = st.text(
    alphabet=st.sampled_from([*"helowrdtcasnmzq ☃é\n", "😀"]), min_size=1, max_size=30
).filter(lambda t: not t[0].isspace())


@pytest.fixture(scope="module")
def hf_spm() -> Any:
    gguf_mapping = pytest.importorskip("transformers.integrations.gguf")
    meta = spm_metadata()
    backend, _ = gguf_mapping.convert_gguf_tokenizer(
        "llama",
        {
            "tokenizer_type": "llama",
            "tokens": meta["tokenizer.ggml.tokens"],
            "scores": meta["tokenizer.ggml.scores"],
            "token_type": meta["tokenizer.ggml.token_type"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "unk_token_id": 0,
        },
    )
    return backend


@settings(max_examples=150, deadline=None)
@given(text=_SPM_TEXTS)
def test_ids_match_transformers_conversion(spm: Tokenizer, hf_spm: Any, text: str) -> None:
    assert spm.encode(text) == hf_spm.encode(text, add_special_tokens=False).ids
