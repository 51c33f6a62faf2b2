"""Each ``tokenizer.ggml.pre`` family on a tiny ``gpt2`` vocabulary, where the regexes differ.

Merges: "3 4" (rank 0) then "1 2", "' T", "Ċ Ċ" (two newlines); "hello" and "$hello" are
tokens no merge produces (only a family that ignores merges for whole words emits them).
Expectations are worked out by hand from llama.cpp's regexes:

* "1234": GPT-2 keeps one piece and "3 4" wins -> 12 34; Llama 3 cuts 123|4 -> 12 3 4;
  SmolLM/Qwen 2 cut every digit; Falcon's trailing [0-9]{3} pass cuts 123|4 too.
* "DON'T": the Llama 3 and Qwen 2 contractions are case-insensitive ('T), GPT-2's are not.
* "a\\n\\nb": Llama 3 and Qwen 2 keep newline runs together (\\s*[\\r\\n]+), GPT-2 does not.
"""

from __future__ import annotations

import logging

import pytest
from synthetic_vocabs import byte_level_metadata, texts_of

from rocmforge.tokenizer import Tokenizer
from rocmforge.tokenizer.pretokenizers import PRE_TOKENIZERS
from rocmforge.tokenizer.token_bytes import bytes_to_unicode

MERGES = ["3 4", "1 2", "' T", "Ċ Ċ"]
EXTRA = ["hello", "$hello"]

GPT2 = {
    "1234": ["12", "34"],
    "DON'T": ["D", "O", "N", "'", "T"],
    "a\n\nb": ["a", "Ċ", "Ċ", "b"],
    "$hello": ["$", "h", "e", "l", "l", "o"],
}
LLAMA3 = {
    "1234": ["12", "3", "4"],
    "DON'T": ["D", "O", "N", "'T"],
    "a\n\nb": ["a", "ĊĊ", "b"],
    "$hello": ["$hello"],  # ignore_merges: the whole word is a token
}
SMOLLM = {**GPT2, "1234": ["1", "2", "3", "4"]}
QWEN2 = {**LLAMA3, "1234": ["1", "2", "3", "4"], "$hello": ["$", "h", "e", "l", "l", "o"]}
FALCON = {**GPT2, "1234": ["12", "3", "4"]}

EXPECTED = {
    "gpt2": GPT2,
    "gpt-2": GPT2,
    "default": GPT2,
    "llama-bpe": LLAMA3,
    "llama3": LLAMA3,
    "smollm": SMOLLM,
    "starcoder": SMOLLM,
    "qwen2": QWEN2,
    "falcon": FALCON,
}


@pytest.mark.parametrize("pre", sorted(EXPECTED))
def test_family_splits(pre: str) -> None:
    tokenizer = Tokenizer.from_gguf_metadata(
        byte_level_metadata(MERGES, pre=pre, extra_tokens=EXTRA)
    )
    for text, expected in EXPECTED[pre].items():
        ids = tokenizer.encode(text)
        assert texts_of(tokenizer, ids) == expected, (pre, text)
        assert tokenizer.decode(ids) == text


def test_llama3_family_adds_bos_unless_the_file_says_otherwise() -> None:
    assert Tokenizer.from_gguf_metadata(byte_level_metadata(MERGES, pre="llama-bpe")).add_bos
    assert not Tokenizer.from_gguf_metadata(byte_level_metadata(MERGES, pre="smollm")).add_bos
    meta = {**byte_level_metadata(MERGES, pre="llama-bpe"), "tokenizer.ggml.add_bos_token": False}
    assert not Tokenizer.from_gguf_metadata(meta).add_bos


@pytest.mark.parametrize("pre", ["no-such-pre", None])
def test_unknown_or_missing_pre_falls_back_to_gpt2(
    pre: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="rocmforge.tokenizer.pretokenizers"):
        tokenizer = Tokenizer.from_gguf_metadata(
            byte_level_metadata(MERGES, pre=pre, extra_tokens=EXTRA)
        )
    assert "pre-tokenizer" in caplog.text
    for text, expected in GPT2.items():
        assert texts_of(tokenizer, tokenizer.encode(text)) == expected


def test_every_table_entry_builds() -> None:
    for pre in PRE_TOKENIZERS:
        tokenizer = Tokenizer.from_gguf_metadata(byte_level_metadata(MERGES, pre=pre))
        assert tokenizer.decode(tokenizer.encode("It's 2024!\n\n  ok")) == "It's 2024!\n\n  ok"


def test_special_and_user_defined_tokens_are_matched_whole() -> None:
    meta = byte_level_metadata(MERGES, user_defined=["<think>"])
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    think = tokenizer.token_to_id("<think>")
    ids = tokenizer.encode("<|im_start|>x<think>y<|im_end|>")
    assert ids == [1, tokenizer.token_to_id("x"), think, tokenizer.token_to_id("y"), 2]
    # user-defined tokens are text, not control: kept by skip_special, and not special
    assert not tokenizer.is_special(think) and tokenizer.is_special(1)
    assert tokenizer.decode(ids, skip_special=True) == "x<think>y"
    assert tokenizer.token_bytes(think) == b"<think>"


def test_byte_level_token_bytes() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(byte_level_metadata(["Ġ Ġ", "Ã ©"]))
    assert tokenizer.token_bytes(tokenizer.token_to_id("ĠĠ")) == b"  "
    assert tokenizer.token_bytes(tokenizer.token_to_id("Ã©")) == "é".encode()
    assert tokenizer.token_bytes(tokenizer.token_to_id("Ã")) == b"\xc3"
    assert tokenizer.token_bytes(0) == b"<|endoftext|>"


def test_byte_alphabet_is_gpt2s() -> None:
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    assert bytes_to_unicode() == convert.bytes_to_unicode()
    assert bytes_to_unicode()[ord(" ")] == "Ġ" and bytes_to_unicode()[ord("\n")] == "Ċ"
