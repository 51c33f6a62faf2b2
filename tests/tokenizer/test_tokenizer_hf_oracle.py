"""Random text through our tokenizer and HF transformers' GGUF tokenizer: identical ids.

transformers' GGUF loader has no entry for ``tokenizer.ggml.pre = smollm`` and falls back
to plain GPT-2 splitting, which groups digits with the spaces before them ("  0").  The
oracle therefore gets SmolLM's upstream pre-tokenizer (``Digits`` then GPT-2
``ByteLevel``, as in the model's own ``tokenizer.json``); vocabulary, merges and special
tokens stay transformers' conversion.  ``test_digits_after_spaces`` pins the difference.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rocmforge.tokenizer import Tokenizer
from rocmforge.tokenizer.token_bytes import bytes_to_unicode

pytestmark = pytest.mark.slow  # needs the default model

# Pieces where tokenizers tend to disagree: special tokens (whole and broken), whitespace
# runs, digits (SmolLM splits them one by one), contractions, byte-level look-alikes.
_PIECES = st.sampled_from(
    [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_start",
        "im_end|>",
        "<repo_name>",
        " ",
        "  ",
        "   ",
        "\n",
        "\n\n",
        "\t",
        "\r\n",
        " \n ",
        "\u00a0",
        "\u3000",
        "0",
        "42",
        " 1234567",
        "3.14",
        "-7",
        "\u00b2",
        "\u00bd",
        "\u0663\u0664",
        "\u2167",
        "'s",
        "'T",
        "don't",
        " I'm",
        "ĠĠ",
        "Ċ",
        "\u2581",
        "é",
        "東京",
        "😀👍",
        "\u200d",
    ]
)
_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=16)
_ASCII = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24)
TEXTS = st.lists(st.one_of(_PIECES, _TEXT, _ASCII), max_size=10).map("".join)


@pytest.fixture(scope="module")
def oracle(hf_smollm: Any) -> Any:
    """transformers' GGUF tokenizer backend with SmolLM's upstream pre-tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer.from_str(hf_smollm.backend_tokenizer.to_str())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Digits(individual_digits=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return backend


@pytest.fixture(scope="module")
def bytes_missing_from_vocab(smollm: Tokenizer) -> frozenset[int]:
    """Bytes with no token (0xC0, 0xF5.., ...): text using them cannot round-trip."""
    alphabet = bytes_to_unicode()
    return frozenset(b for b in range(256) if smollm.token_to_id(alphabet[b]) is None)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXTS)
def test_ids_match_transformers(
    smollm: Tokenizer, oracle: Any, bytes_missing_from_vocab: frozenset[int], text: str
) -> None:
    ids = smollm.encode(text)
    assert ids == oracle.encode(text, add_special_tokens=False).ids
    if not bytes_missing_from_vocab.intersection(text.encode("utf-8")):
        assert smollm.decode(ids) == text


def test_digits_after_spaces(smollm: Tokenizer, hf_smollm: Any) -> None:
    """llama.cpp's smollm split: "\\p{N}" first, so "  0" is "  " + "0" (ĠĠ, 0); stock
    transformers splits GPT-2 style into " " + " 0" (Ġ, Ġ, 0)."""
    assert [smollm.id_to_token(i) for i in smollm.encode("  0")] == ["ĠĠ", "0"]
    stock = hf_smollm.encode("  0", add_special_tokens=False)
    assert [smollm.id_to_token(i) for i in stock] == ["Ġ", "Ġ", "0"]


def test_missing_bytes_are_dropped_like_transformers(
    smollm: Tokenizer, oracle: Any, bytes_missing_from_vocab: frozenset[int]
) -> None:
    """A character whose UTF-8 uses a byte with no token loses that byte (llama.cpp and HF
    both drop it): U+40000 is F1 80 80 80 and the vocabulary has no token for 0xF1."""
    assert 0xF1 in bytes_missing_from_vocab
    ids = smollm.encode("a\U00040000b")
    assert ids == oracle.encode("a\U00040000b", add_special_tokens=False).ids
    assert b"".join(smollm.token_bytes(i) for i in ids) == b"a\x80\x80\x80b"
